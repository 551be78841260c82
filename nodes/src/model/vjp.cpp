// The one libtorch entry point flowrun needs that tch does not expose: a vector-Jacobian
// product with *given* output gradients, torch::autograd::grad(outputs, inputs, grad_outputs).
// tch's `run_backward` seeds the backward with ones, so a VJP through it needs an extra
// objective (Σ y ⊙ g) whose forward and backward read and write the whole output again.
#include <torch/csrc/autograd/autograd.h>

#include <exception>
#include <string>
#include <vector>

extern "C" {

// grad of `output` (seeded with `grad_output`) with respect to `inputs[0..n)`, written to
// `results` as new heap tensors (tch takes ownership; null when an input is unused). Returns
// null on success, else the error text (valid until the thread's next call).
const char *flowrun_vjp(const at::Tensor *output, const at::Tensor *grad_output,
                        const at::Tensor *const *inputs, int n, at::Tensor **results) {
  thread_local std::string error;
  try {
    std::vector<at::Tensor> in;
    in.reserve(n);
    for (int i = 0; i < n; ++i) in.push_back(*inputs[i]);
    auto g = torch::autograd::grad({*output}, in, {*grad_output}, /*retain_graph=*/false,
                                   /*create_graph=*/false, /*allow_unused=*/true);
    for (int i = 0; i < n; ++i) results[i] = g[i].defined() ? new at::Tensor(g[i]) : nullptr;
    return nullptr;
  } catch (const std::exception &e) {
    error = e.what();
    return error.c_str();
  }
}
}
