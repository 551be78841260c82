//! `http_reward`: score images with a user's reward server over plain HTTP (PickScore, HPSv2,
//! ImageReward, OCR, VLM judges served from Python). The protocol is documented on the node (and
//! in README "Reward plug-ins"); `examples/reward_server/server.py` is a reference server.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use base64::Engine as _;
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, ParamKind, PortDef, Registry};
use serde_json::{Value, json};

use crate::nonfinite::{self, OnNonFinite};
use crate::shape_eval::log_metrics;
use crate::types::{Images, PromptBatch, Rewards};
use crate::world::{IMAGE_SIZE, chw_to_rgb8};

/// Protocol name and version sent in every request.
pub const PROTOCOL: &str = "flowrun-reward/1";

/// `Err` (the message) unless `url` is a plain `http://` URL with a host: checked at validation
/// (`checks::schedule`) and again when the node is built.
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    match url.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
        Some(_) => Err(format!(
            "url `{url}` has no host (e.g. http://127.0.0.1:8000/score)"
        )),
        None => Err(format!(
            "url `{url}` must start with http:// (TLS is not supported: run the server next to \
             the trainer or behind a local proxy)"
        )),
    }
}

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "http_reward",
        summary: "score images with an external reward server over HTTP (JSON protocol)",
        doc: "POSTs the batch, split into requests of `batch_size` images (`concurrency` in flight),\n\
              to `url` and reads one score per image (plus optional named sub-scores).\n\
              Request (JSON):\n\
                {\"protocol\": \"flowrun-reward/1\", \"iteration\": 3, \"step\": 2, \"t\": 0.66,\n\
                 \"encoding\": \"png\", \"height\": 32, \"width\": 32, \"channels\": 3,\n\
                 \"items\": [{\"index\": 0, \"prompt_id\": \"train-00042\", \"prompt\": \"a red circle\",\n\
                              \"category\": \"colors\", \"target\": {…}, \"group\": 0, \"member\": 0,\n\
                              \"image\": \"<base64>\"}, …]}\n\
              `step` is the repeat step (1-based; 0 outside a repeat); `index` is the sample's\n\
              position in the whole batch; `height`/`width` are the images' (any size: 32×32 for\n\
              ShapeWorld, e.g. 1024×1024 after `vae_decode`). `image` by `encoding`: png = a\n\
              base64 PNG (8-bit RGB); u8 = base64 raw RGB bytes, HWC (height·width·3); f32 =\n\
              base64 little-endian f32, CHW (3·height·width), values in [-1, 1].\n\
              Response (JSON, HTTP 200): {\"scores\": [0.71, …], \"sub_scores\": {\"aesthetic\": [5.2, …]}}\n\
              with one score per item, in order; `sub_scores` is optional, each list one value per\n\
              item. NaN, Infinity, -Infinity (Python's json.dumps writes them) and null count as\n\
              non-finite (see `on_nonfinite`); anything else that is not a number is an error.\n\
              Failures: connection errors, timeouts, HTTP 5xx and 429 are retried `retries` times,\n\
              waiting backoff_s·2^(attempt−1); other HTTP errors, malformed JSON and wrong lengths\n\
              fail at once. Every error names the URL and the item (prompt id); the run stops and\n\
              can be resumed from the last checkpoint. Metrics: reward_mean, sub_<name>_mean,\n\
              requests, retries, nonfinite. Plain http:// only (no TLS): run the server next to\n\
              the trainer or behind a local proxy.",
        inputs: vec![
            PortDef::new("images", "images", "images to score, [B, 3, H, W] in [-1, 1]"),
            PortDef::new(
                "prompts",
                "prompts",
                "the batch's prompts (sent with each image)",
            ),
        ],
        outputs: vec![PortDef::new("rewards", "rewards", "one reward per sample")],
        params: vec![
            ParamDef::new(
                "url",
                ParamKind::Str,
                "the scoring endpoint, e.g. http://127.0.0.1:8000/score",
            ),
            ParamDef::choice(
                "encoding",
                "png",
                &["png", "u8", "f32"],
                "image encoding: base64 PNG, base64 raw RGB8 (HWC), or base64 f32 LE (CHW, [-1, 1])",
            ),
            ParamDef::int(
                "batch_size",
                32,
                1,
                100_000,
                "images per request",
            ),
            ParamDef::int(
                "concurrency",
                2,
                1,
                64,
                "requests in flight at once",
            ),
            ParamDef::float(
                "timeout_s",
                60.0,
                0.001,
                86_400.0,
                "limit on one request (connect, send, wait, read)",
            ),
            ParamDef::int(
                "retries",
                3,
                0,
                20,
                "retries of a failed request (connection error, timeout, HTTP 5xx/429)",
            ),
            ParamDef::float(
                "backoff_s",
                1.0,
                0.0,
                3600.0,
                "wait before retry n: backoff_s·2^(n−1)",
            ),
            nonfinite::param(),
        ],
        resources: vec![],
        factory: |ctx| {
            let p = ctx.params;
            let client = RewardClient::new(
                p.str("url")?,
                Encoding::parse(p.str("encoding")?)?,
                p.usize("batch_size")?,
                p.usize("concurrency")?,
                p.f64("timeout_s")?,
                p.usize("retries")?,
                p.f64("backoff_s")?,
            )
            .map_err(|e| anyhow!("http_reward `{}`: {e}", ctx.id))?;
            Ok(Box::new(HttpReward {
                client,
                on_nonfinite: OnNonFinite::from_params(p)?,
                step: ctx.step.map_or(0, |s| s.0),
            }))
        },
    });
}

/// How images travel in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Png,
    U8,
    F32,
}

impl Encoding {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "png" => Encoding::Png,
            "u8" => Encoding::U8,
            "f32" => Encoding::F32,
            other => bail!("unknown encoding `{other}`"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Png => "png",
            Encoding::U8 => "u8",
            Encoding::F32 => "f32",
        }
    }
    /// Base64 of one CHW [3, 32, 32] image in [-1, 1].
    pub fn encode(self, img: &[f32]) -> Result<String> {
        self.encode_hw(img, IMAGE_SIZE, IMAGE_SIZE)
    }

    /// Base64 of one CHW [3, height, width] image in [-1, 1].
    pub fn encode_hw(self, img: &[f32], height: usize, width: usize) -> Result<String> {
        if img.len() != 3 * height * width {
            bail!(
                "expected a CHW [3, {height}, {width}] image of {} values, got {}",
                3 * height * width,
                img.len()
            );
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(match self {
            Encoding::F32 => {
                let bytes: Vec<u8> = img.iter().flat_map(|v| v.to_le_bytes()).collect();
                b64.encode(bytes)
            }
            Encoding::U8 => b64.encode(chw_to_rgb8(img, height, width)?),
            Encoding::Png => {
                let rgb = chw_to_rgb8(img, height, width)?;
                let (h, w) = (u32::try_from(height)?, u32::try_from(width)?);
                let mut bytes = Vec::new();
                {
                    let mut enc = png::Encoder::new(&mut bytes, w, h);
                    enc.set_color(png::ColorType::Rgb);
                    enc.set_depth(png::BitDepth::Eight);
                    let mut w = enc.write_header()?;
                    w.write_image_data(&rgb)?;
                    w.finish()?;
                }
                b64.encode(bytes)
            }
        })
    }
}

struct HttpReward {
    client: RewardClient,
    on_nonfinite: OnNonFinite,
    step: usize,
}

/// A client of a `flowrun-reward/1` server: what the `http_reward` node sends and how it
/// retries, usable outside a pipeline (`flowrun eval`).
pub struct RewardClient {
    url: String,
    encoding: Encoding,
    batch_size: usize,
    concurrency: usize,
    timeout: Duration,
    retries: usize,
    backoff_s: f64,
    agent: ureq::Agent,
}

/// What a server answered for a batch: the scores as sent (f64; a non-finite score is NaN or
/// ±inf), one per image, and the named sub-scores.
pub struct ServerScores {
    pub scores: Vec<f64>,
    pub subs: BTreeMap<String, Vec<f64>>,
    /// Requests sent (one per `batch_size` images).
    pub requests: usize,
    /// Retries made.
    pub retries: usize,
    /// Wall time of the requests.
    pub wall_s: f64,
}

/// Scores of one request: `scores[i]`, and `subs[name][i]`.
struct BatchScores {
    scores: Vec<f64>,
    subs: BTreeMap<String, Vec<f64>>,
}

enum Failure {
    /// Worth another try (connection, timeout, 5xx, 429).
    Transient(String),
    /// Retrying cannot help (4xx, malformed response).
    Fatal(String),
}

impl RewardClient {
    /// A client of the server at `url` (a plain `http://` URL, see [`check_url`]), sending
    /// `batch_size` images per request in `encoding`, `concurrency` requests in flight, each
    /// limited to `timeout_s` and retried `retries` times after `backoff_s·2^(n−1)`.
    pub fn new(
        url: &str,
        encoding: Encoding,
        batch_size: usize,
        concurrency: usize,
        timeout_s: f64,
        retries: usize,
        backoff_s: f64,
    ) -> Result<Self> {
        check_url(url).map_err(anyhow::Error::msg)?;
        if batch_size == 0 || concurrency == 0 {
            bail!("batch_size and concurrency must be at least 1");
        }
        let timing_ok =
            timeout_s.is_finite() && timeout_s > 0.0 && backoff_s.is_finite() && backoff_s >= 0.0;
        if !timing_ok {
            bail!("timeout_s must be > 0 and backoff_s >= 0");
        }
        let timeout = Duration::from_secs_f64(timeout_s);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(RewardClient {
            url: url.to_string(),
            encoding,
            batch_size,
            concurrency,
            timeout,
            retries,
            backoff_s,
            agent,
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Describe items `range` of the batch for error messages.
    fn items(prompts: &PromptBatch, range: std::ops::Range<usize>) -> String {
        let ids: Vec<&str> = prompts.records[range.clone()]
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        let mut uniq = ids.clone();
        uniq.dedup();
        let shown: Vec<String> = uniq.iter().take(4).map(|s| format!("`{s}`")).collect();
        let more = if uniq.len() > 4 { ", …" } else { "" };
        format!(
            "items {}..{} (prompts {}{more})",
            range.start,
            range.end,
            shown.join(", ")
        )
    }

    fn post_once(&self, body: &str) -> std::result::Result<String, Failure> {
        let classify = |e: ureq::Error| match e {
            ureq::Error::Timeout(_) => Failure::Transient(format!(
                "timed out after {} s (timeout_s)",
                self.timeout.as_secs_f64()
            )),
            other => Failure::Transient(other.to_string()),
        };
        let mut resp = self
            .agent
            .post(&self.url)
            .header("content-type", "application/json")
            .send(body)
            .map_err(classify)?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(classify)?;
        if status == 200 {
            return Ok(text);
        }
        let snippet: String = text.trim().chars().take(200).collect();
        let msg = format!("HTTP {status}: {snippet}");
        if status >= 500 || status == 429 {
            Err(Failure::Transient(msg))
        } else {
            Err(Failure::Fatal(msg))
        }
    }

    /// One request with bounded retries; `Err` is the full message.
    fn request(
        &self,
        body: &str,
        n: usize,
        abort: &AtomicBool,
        retries_used: &AtomicUsize,
    ) -> std::result::Result<BatchScores, String> {
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                if abort.load(Ordering::SeqCst) {
                    return Err(format!("{last} (not retried: another request failed)"));
                }
                retries_used.fetch_add(1, Ordering::SeqCst);
                let wait = self.backoff_s * 2f64.powi(attempt as i32 - 1);
                std::thread::sleep(Duration::from_secs_f64(wait));
            }
            match self.post_once(body) {
                Ok(text) => return parse_response(&text, n),
                Err(Failure::Fatal(m)) => return Err(m),
                Err(Failure::Transient(m)) => last = m,
            }
        }
        Err(format!(
            "{last} (gave up after {} attempts; retries: {})",
            self.retries + 1,
            self.retries
        ))
    }
}

/// Python's json module writes NaN, Infinity and -Infinity bare; make them strings so the
/// response parses and the value can be reported as non-finite.
fn quote_nonfinite_literals(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len() + 16);
    let (mut i, mut in_str, mut esc) = (0, false, false);
    'outer: while i < b.len() {
        let c = b[i];
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else if c == b'"' {
            in_str = true;
        } else {
            for lit in ["-Infinity", "Infinity", "NaN"] {
                if b[i..].starts_with(lit.as_bytes()) {
                    out.push(b'"');
                    out.extend_from_slice(lit.as_bytes());
                    out.push(b'"');
                    i += lit.len();
                    continue 'outer;
                }
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// A score: a number, or a non-finite marker (NaN for null/"NaN").
fn score_value(v: &Value) -> std::result::Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a float")),
        Value::Null => Ok(f64::NAN),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "nan" => Ok(f64::NAN),
            "infinity" | "inf" => Ok(f64::INFINITY),
            "-infinity" | "-inf" => Ok(f64::NEG_INFINITY),
            _ => Err(format!("\"{s}\" is not a number")),
        },
        other => Err(format!("{other} is not a number")),
    }
}

/// Parse a response carrying `n` scores. Errors say what is wrong (the caller adds where).
fn parse_response(text: &str, n: usize) -> std::result::Result<BatchScores, String> {
    let short = || text.trim().chars().take(200).collect::<String>();
    let v: Value = serde_json::from_str(&quote_nonfinite_literals(text))
        .map_err(|e| format!("response is not JSON ({e}): {}", short()))?;
    let list = |v: &Value, what: &str| -> std::result::Result<Vec<f64>, String> {
        let a = v
            .as_array()
            .ok_or_else(|| format!("`{what}` is not a list: {}", short()))?;
        if a.len() != n {
            return Err(format!(
                "`{what}` has {} values for {n} images (malformed response)",
                a.len()
            ));
        }
        a.iter()
            .enumerate()
            .map(|(i, x)| score_value(x).map_err(|e| format!("`{what}`[{i}]: {e}")))
            .collect()
    };
    let scores = list(
        v.get("scores").ok_or_else(|| {
            format!(
                "response has no `scores` (expected {{\"scores\": [...]}}): {}",
                short()
            )
        })?,
        "scores",
    )?;
    let mut subs = BTreeMap::new();
    match v.get("sub_scores") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (name, vals) in m {
                subs.insert(name.clone(), list(vals, &format!("sub_scores.{name}"))?);
            }
        }
        Some(other) => return Err(format!("`sub_scores` is not an object: {other}")),
    }
    Ok(BatchScores { scores, subs })
}

/// A score that cannot be an f32 reward, for messages: NaN/±inf as such, a finite value exactly
/// as sent, with why it does not fit.
fn describe_unusable(v: f64) -> String {
    if v.is_finite() {
        format!(
            "{v:e} (outside the range of an f32 reward, ±{:e})",
            f32::MAX
        )
    } else {
        v.to_string()
    }
}

/// The index of the item a `what[i]: …` message refers to, for naming its prompt.
fn item_of(msg: &str) -> Option<usize> {
    let open = msg.find("`[")? + 2;
    let close = msg[open..].find(']')? + open;
    msg[open..close].parse().ok()
}

impl RewardClient {
    /// Scores `pixels` (B CHW [3, height, width] images in [-1, 1], B = `prompts.len()`),
    /// sending each image with its prompt; `at` = (iteration, step, t) as the requests state
    /// them. Errors name the URL, the item (prompt id) and `where_` (e.g. "at iteration 3,
    /// step 2").
    pub fn score(
        &self,
        pixels: &[f32],
        (height, width): (usize, usize),
        prompts: &PromptBatch,
        (iteration, step, t): (u64, usize, f32),
        where_: &str,
    ) -> Result<ServerScores> {
        let len = 3 * height * width;
        let b = prompts.len();
        if pixels.len() != b * len {
            bail!(
                "reward server {}: {} values for {b} images of 3×{height}×{width}",
                self.url,
                pixels.len()
            );
        }
        let ranges: Vec<std::ops::Range<usize>> = (0..b)
            .step_by(self.batch_size)
            .map(|s| s..(s + self.batch_size).min(b))
            .collect();
        let url = &self.url;
        // Bodies are built up front (encoding errors are ours, not the server's).
        let mut bodies = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let mut items = Vec::with_capacity(r.len());
            for i in r.clone() {
                let rec = &prompts.records[i];
                let mut item = json!({
                    "index": i,
                    "prompt_id": rec.id,
                    "prompt": rec.prompt,
                    "group": prompts.group[i],
                    "member": prompts.member[i],
                    "image": self.encoding.encode_hw(&pixels[i * len..(i + 1) * len], height, width)?,
                });
                // The dataset's own fields (ShapeWorld: category, target; GenEval: tag, …).
                if let Some(obj) = item.as_object_mut() {
                    for (k, v) in &rec.metadata {
                        obj.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
                items.push(item);
            }
            bodies.push(
                json!({
                    "protocol": PROTOCOL,
                    "iteration": iteration,
                    "step": step,
                    "t": t,
                    "encoding": self.encoding.name(),
                    "height": height,
                    "width": width,
                    "channels": 3,
                    "items": items,
                })
                .to_string(),
            );
        }
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let retries_used = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<std::result::Result<BatchScores, String>>>> =
            Mutex::new((0..ranges.len()).map(|_| None).collect());
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..self.concurrency.min(ranges.len()) {
                s.spawn(|| {
                    loop {
                        let k = next.fetch_add(1, Ordering::SeqCst);
                        if k >= ranges.len() || abort.load(Ordering::SeqCst) {
                            break;
                        }
                        let r = self.request(&bodies[k], ranges[k].len(), &abort, &retries_used);
                        if r.is_err() {
                            abort.store(true, Ordering::SeqCst);
                        }
                        if let Ok(mut res) = results.lock() {
                            res[k] = Some(r);
                        }
                    }
                });
            }
        });
        let results = results
            .into_inner()
            .map_err(|_| anyhow!("http_reward: a request thread panicked"))?;
        // Scores as the server sent them (f64), for messages; rewards are f32.
        let mut sent = vec![f64::NAN; b];
        let mut subs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (k, r) in results.into_iter().enumerate() {
            let range = ranges[k].clone();
            let scores = match r {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    // Name the exact item when the message points at one.
                    let what = match item_of(&e) {
                        Some(j) if j < range.len() => {
                            let rec = &prompts.records[range.start + j];
                            format!("item {} (prompt `{}`)", range.start + j, rec.id)
                        }
                        _ => Self::items(prompts, range.clone()),
                    };
                    bail!("reward server {url}: {e}; {what}, {where_}");
                }
                // Not sent because another request failed first (reported above).
                None => continue,
            };
            sent[range.clone()].copy_from_slice(&scores.scores);
            for (name, vs) in scores.subs {
                let all = subs.entry(name).or_insert_with(|| vec![f64::NAN; b]);
                all[range.clone()].copy_from_slice(&vs);
            }
        }
        Ok(ServerScores {
            scores: sent,
            subs,
            requests: ranges.len(),
            retries: retries_used.load(Ordering::SeqCst),
            wall_s: t0.elapsed().as_secs_f64(),
        })
    }
}

impl Node for HttpReward {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let images = inputs.get::<Images>("images")?;
        let prompts = inputs.get::<PromptBatch>("prompts")?;
        let (pixels, height, width) = images
            .rgb("images")
            .map_err(|e| anyhow!("http_reward `{}`: {e}", ctx.id))?;
        let b = prompts.len();
        if images.batch() != b {
            bail!(
                "http_reward `{}`: got {} images for {b} prompts",
                ctx.id,
                images.batch()
            );
        }
        let url = self.client.url();
        let where_ = format!("at iteration {}, step {}", ctx.iteration, self.step);
        let scored = self.client.score(
            &pixels,
            (height, width),
            prompts,
            (ctx.iteration, self.step, images.t),
            &where_,
        )?;
        let sent = &scored.scores;
        let subs = &scored.subs;
        // A finite score beyond f32's range becomes ±inf here, and is treated as non-finite.
        let mut values: Vec<f32> = sent.iter().map(|&v| v as f32).collect();
        let mut bad = 0;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            match self.on_nonfinite {
                OnNonFinite::Error => {
                    let rec = &prompts.records[i];
                    bail!(
                        "reward server {url} returned {} for item {i} (prompt `{}`: \"{}\") {where_}; \
                         the iteration is not applied (set `on_nonfinite: skip` to give such samples \
                         their group's mean reward instead)",
                        describe_unusable(sent[i]),
                        rec.id,
                        rec.prompt
                    );
                }
                OnNonFinite::Skip => {
                    bad = nonfinite::fill_with_group_mean(&mut values, &prompts.group);
                }
            }
        }
        for (name, vs) in subs {
            let finite: Vec<f64> = vs.iter().copied().filter(|v| v.is_finite()).collect();
            if finite.len() < vs.len() && self.on_nonfinite == OnNonFinite::Error {
                let i = vs.iter().position(|v| !v.is_finite()).unwrap_or(0);
                bail!(
                    "reward server {url} returned sub-score `{name}` = {} for item {i} (prompt `{}`) \
                     {where_} (set `on_nonfinite: skip` to leave such values out of the metric)",
                    vs[i],
                    prompts.records[i].id
                );
            }
            if !finite.is_empty() {
                ctx.metric(
                    &format!("sub_{name}_mean"),
                    finite.iter().sum::<f64>() / finite.len() as f64,
                );
            }
        }
        let r = Rewards {
            values,
            step: self.step,
            ..Rewards::default()
        };
        log_metrics(ctx, &r);
        ctx.metric("requests", scored.requests as f64);
        ctx.metric("retries", scored.retries as f64);
        ctx.metric("nonfinite", bad as f64);
        ctx.metric("request_wall_s", scored.wall_s);
        Ok(Outputs::new().with("rewards", r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_describe_a_finite_score_beyond_f32_range_as_sent() {
        assert_eq!(
            describe_unusable(1e308),
            "1e308 (outside the range of an f32 reward, ±3.4028235e38)"
        );
        assert_eq!(
            describe_unusable(-4e38),
            "-4e38 (outside the range of an f32 reward, ±3.4028235e38)"
        );
        assert_eq!(describe_unusable(f64::NAN), "NaN");
        assert_eq!(describe_unusable(f64::INFINITY), "inf");
    }

    #[test]
    fn should_parse_scores_sub_scores_and_python_nonfinite_literals() {
        let r = parse_response(
            r#"{"scores": [0.5, NaN, -Infinity], "sub_scores": {"a": [1, 2, 3]}}"#,
            3,
        )
        .unwrap();
        assert_eq!(r.scores[0], 0.5);
        assert!(r.scores[1].is_nan() && r.scores[2] == f64::NEG_INFINITY);
        assert_eq!(r.subs["a"], vec![1.0, 2.0, 3.0]);
        // A string that merely contains NaN stays a string, and is not a number.
        let e = parse_response(r#"{"scores": [1, "NaN-ish"]}"#, 2)
            .err()
            .unwrap();
        assert!(
            e.contains("`scores`[1]") && e.contains("not a number"),
            "{e}"
        );
        assert_eq!(item_of(&e), Some(1));
        let e = parse_response(r#"{"scores": [1, 2]}"#, 3).err().unwrap();
        assert!(e.contains("2 values for 3 images"), "{e}");
        let e = parse_response("<html>oops</html>", 1).err().unwrap();
        assert!(e.contains("not JSON"), "{e}");
    }

    #[test]
    fn should_encode_images_of_any_size() {
        let (h, w) = (64, 48);
        let img: Vec<f32> = (0..3 * h * w)
            .map(|i| (i % 11) as f32 / 5.0 - 1.0)
            .collect();
        let b64 = base64::engine::general_purpose::STANDARD;
        let u = b64
            .decode(Encoding::U8.encode_hw(&img, h, w).unwrap())
            .unwrap();
        assert_eq!(u, chw_to_rgb8(&img, h, w).unwrap());
        let p = b64
            .decode(Encoding::Png.encode_hw(&img, h, w).unwrap())
            .unwrap();
        let reader = png::Decoder::new(std::io::Cursor::new(p))
            .read_info()
            .unwrap();
        assert_eq!((reader.info().width, reader.info().height), (48, 64));
        assert!(Encoding::F32.encode_hw(&img, h, h).is_err());
    }

    #[test]
    fn should_encode_images_in_each_format() {
        use crate::world::{IMAGE_LEN, image_to_rgb8};
        let img: Vec<f32> = (0..IMAGE_LEN).map(|i| (i % 7) as f32 / 3.0 - 1.0).collect();
        let b64 = base64::engine::general_purpose::STANDARD;
        let f = b64.decode(Encoding::F32.encode(&img).unwrap()).unwrap();
        assert_eq!(f.len(), IMAGE_LEN * 4);
        assert_eq!(f32::from_le_bytes(f[4..8].try_into().unwrap()), img[1]);
        let u = b64.decode(Encoding::U8.encode(&img).unwrap()).unwrap();
        assert_eq!(u, image_to_rgb8(&img).unwrap());
        let p = b64.decode(Encoding::Png.encode(&img).unwrap()).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(p))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(buf, u);
    }
}
