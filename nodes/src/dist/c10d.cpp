// flowrun's bridge to libtorch's c10d: the rendezvous store (TCPStore, as torchrun uses it) and
// a process group (Gloo on CPU; NCCL on CUDA when built with its headers). tch exposes none of
// it. Every entry point catches C++ exceptions and returns the error text (null on success;
// the text stays valid until the calling thread's next call).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

thread_local std::string error_text;

template <typename F>
const char *guarded(F f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error &e) {
    error_text = e.what_without_backtrace();
  } catch (const std::exception &e) {
    error_text = e.what();
  } catch (...) {
    error_text = "unknown C++ exception";
  }
  return error_text.c_str();
}

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  bool cuda = false;
  int cuda_device = 0;
  std::chrono::milliseconds timeout;
};

at::Tensor host_tensor(void *data, int64_t n, at::ScalarType ty) {
  return at::from_blob(data, {n}, at::TensorOptions().dtype(ty).device(at::kCPU));
}

// Runs `op` on a tensor over `data`: in place on the host (Gloo), or through a copy on the
// group's GPU (NCCL needs device memory).
template <typename F>
void on_tensor(Group *g, void *data, int64_t n, at::ScalarType ty, F op) {
  at::Tensor host = host_tensor(data, n, ty);
  if (!g->cuda) {
    std::vector<at::Tensor> ts{host};
    op(ts);
    return;
  }
  at::Tensor dev = host.to(at::Device(at::kCUDA, g->cuda_device));
  std::vector<at::Tensor> ts{dev};
  op(ts);
  host.copy_(ts[0].cpu());
}

}  // namespace

extern "C" {

// Which process groups this build has: bit 0 Gloo, bit 1 NCCL.
int flowrun_c10d_backends() {
  int b = 0;
#ifdef USE_C10D_GLOO
  b |= 1;
#endif
#ifdef USE_C10D_NCCL
  b |= 2;
#endif
  return b;
}

// A store client (rank 0 also hosts the server when `server` is set), and through it a process
// group of `world` ranks. `backend`: 0 Gloo, 1 NCCL on GPU `cuda_device`. `store_only`: no
// process group (a second connection for heartbeats).
const char *flowrun_c10d_connect(const char *host, int port, int rank, int world, int server,
                                 int backend, int cuda_device, int64_t timeout_ms,
                                 const char *prefix, int store_only, void **out) {
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = server != 0;
    opts.numWorkers = server ? std::optional<std::size_t>(world) : std::nullopt;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    opts.useLibUV = false;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto g = new Group();
    g->timeout = std::chrono::milliseconds(timeout_ms);
    g->store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    if (!store_only) {
      if (backend == 0) {
#ifdef USE_C10D_GLOO
        auto o = c10d::ProcessGroupGloo::Options::create(g->timeout);
        o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
        o->threads = 2;
        g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(g->store, rank, world, o);
#else
        delete g;
        throw std::runtime_error(
            "this flowrun was built without Gloo's headers (Debian: apt-get install "
            "libgloo-dev, then rebuild with --features tch)");
#endif
      } else {
#ifdef USE_C10D_NCCL
        auto o = c10d::ProcessGroupNCCL::Options::create();
        o->timeout = g->timeout;
        g->cuda = true;
        g->cuda_device = cuda_device;
        g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(g->store, rank, world, o);
#else
        delete g;
        throw std::runtime_error(
            "this flowrun was built without NCCL's header (nccl.h from the nvidia-nccl wheel "
            "that torch installs): rebuild with --features tch against a CUDA torch");
#endif
      }
    }
    *out = g;
  });
}

void flowrun_c10d_free(void *group) { delete static_cast<Group *>(group); }

const char *flowrun_c10d_allreduce_f32(void *group, float *data, int64_t n) {
  return guarded([&] {
    auto g = static_cast<Group *>(group);
    on_tensor(g, data, n, at::kFloat, [&](std::vector<at::Tensor> &ts) {
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp::SUM;
      g->backend->allreduce(ts, o)->wait(g->timeout);
    });
  });
}

const char *flowrun_c10d_broadcast_u8(void *group, uint8_t *data, int64_t n, int root) {
  return guarded([&] {
    auto g = static_cast<Group *>(group);
    on_tensor(g, data, n, at::kByte, [&](std::vector<at::Tensor> &ts) {
      c10d::BroadcastOptions o;
      o.rootRank = root;
      g->backend->broadcast(ts, o)->wait(g->timeout);
    });
  });
}

// `out` holds world × n bytes: rank r's `n` bytes at r × n.
const char *flowrun_c10d_allgather_u8(void *group, uint8_t *data, int64_t n, uint8_t *out,
                                      int world) {
  return guarded([&] {
    auto g = static_cast<Group *>(group);
    at::Tensor in = host_tensor(data, n, at::kByte);
    at::Device dev = g->cuda ? at::Device(at::kCUDA, g->cuda_device) : at::Device(at::kCPU);
    std::vector<at::Tensor> inputs{in.to(dev)};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < world; ++r)
      outputs[0].push_back(at::empty({n}, at::TensorOptions().dtype(at::kByte).device(dev)));
    g->backend->allgather(outputs, inputs)->wait(g->timeout);
    for (int r = 0; r < world; ++r) {
      at::Tensor part = outputs[0][r].cpu().contiguous();
      std::memcpy(out + static_cast<int64_t>(r) * n, part.data_ptr<uint8_t>(), n);
    }
  });
}

const char *flowrun_c10d_barrier(void *group) {
  return guarded([&] {
    auto g = static_cast<Group *>(group);
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    g->backend->barrier(o)->wait(g->timeout);
  });
}

// Store: set `key` to `n` bytes.
const char *flowrun_c10d_store_set(void *group, const char *key, const uint8_t *value,
                                   int64_t n) {
  return guarded([&] {
    auto g = static_cast<Group *>(group);
    g->store->set(std::string(key), std::vector<uint8_t>(value, value + n));
  });
}

// Store: whether `key` exists (`*found`), and if so its value (up to `cap` bytes into `out`,
// its length in `*len`). Never waits for the key.
const char *flowrun_c10d_store_try_get(void *group, const char *key, uint8_t *out, int64_t cap,
                                       int64_t *len, int *found) {
  return guarded([&] {
    auto g = static_cast<Group *>(group);
    *found = g->store->check({std::string(key)}) ? 1 : 0;
    *len = 0;
    if (*found) {
      auto v = g->store->get(std::string(key));
      *len = static_cast<int64_t>(v.size());
      std::memcpy(out, v.data(), std::min<int64_t>(cap, *len));
    }
  });
}

// Store: atomically add `delta` to the counter `key`; its new value in `*value`.
const char *flowrun_c10d_store_add(void *group, const char *key, int64_t delta,
                                   int64_t *value) {
  return guarded([&] {
    auto g = static_cast<Group *>(group);
    *value = g->store->add(std::string(key), delta);
  });
}
}
