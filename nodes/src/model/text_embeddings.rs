//! Precomputed prompt embeddings, as `scripts/encode_prompts.py` writes them: a text-to-image
//! model's text-encoder outputs for a prompt set, computed once in Python with the model's own
//! encoders and read here without loading the whole (25k PickScore prompts at 205 × 4096 bf16
//! are ~43 GB).
//!
//! A store is one safetensors file, or shards listed by an index json (`FILE.safetensors`
//! sharded into `FILE-00001-of-0000K.safetensors` … beside `FILE.safetensors.index.json`):
//!
//! | tensor | shape | where |
//! |---|---|---|
//! | `prompt_embeds` | `[n, L, D]` | every file: its rows `first_row .. first_row + n` |
//! | `pooled_prompt_embeds` | `[n, P]` | every file |
//! | `negative_prompt_embeds` | `[1, L, D]` | the single file, or the first shard |
//! | `negative_pooled_prompt_embeds` | `[1, P]` | the single file, or the first shard |
//!
//! in f16, bf16 or f32 (one dtype for all), with string metadata in each header (`format`,
//! `encoding_id`, `first_row`, `rows`, `sidecar`, …). The index is
//! `{"metadata": {...}, "shards": [{"file", "first_row", "rows"}, ...]}`. Beside it, the JSONL
//! sidecar (`FILE.jsonl`, or the header's `sidecar`) has one row per prompt:
//! `{"index": i, "prompt": text, "metadata": {...}}`.
//!
//! [`PromptEmbeddings::open`] memory-maps every file and checks everything it can without
//! reading the tensor data: the headers (names, dtypes, shapes, offsets within the file, no
//! bytes left over), that shapes, dtypes and the encoding id agree across shards and with the
//! index, that the rows chain, and that the sidecar has a row per prompt in order. Only the rows
//! asked for are read and converted to f32. Errors name the file and what is wrong; bad input
//! never panics. As with any memory map, a file changed or truncated while open is not
//! supported.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use memmap2::Mmap;
use serde_json::Value;

/// The `format` written in every header by `scripts/encode_prompts.py`.
pub const FORMAT: &str = "flowrun.prompt_embeddings/1";

/// Largest safetensors header read (the real ones are a few kilobytes).
const MAX_HEADER: u64 = 100 * 1024 * 1024;
/// Largest index json read.
const MAX_INDEX: u64 = 64 * 1024 * 1024;

const PROMPT: &str = "prompt_embeds";
const POOLED: &str = "pooled_prompt_embeds";
const NEG: &str = "negative_prompt_embeds";
const NEG_POOLED: &str = "negative_pooled_prompt_embeds";

/// The element type of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F16,
    Bf16,
    F32,
}

impl Dtype {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::Bf16),
            "F32" => Some(Dtype::F32),
            _ => None,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }
    /// The safetensors name (`F16`, `BF16`, `F32`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
            Dtype::F32 => "F32",
        }
    }
    /// Append the little-endian values in `bytes` as f32 (exact for all three).
    fn extend_f32(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            Dtype::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Dtype::Bf16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)),
            ),
            Dtype::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
            ),
        }
    }
}

/// IEEE half → single, exactly (subnormals, infinities and NaN included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: m · 2^-24, normalised.
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// One tensor of a header: dtype, shape and its bytes within the file.
#[derive(Debug, Clone)]
struct TensorInfo {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

/// One memory-mapped safetensors file of a store.
struct Shard {
    path: PathBuf,
    map: Mmap,
    first_row: usize,
    rows: usize,
    embeds: Range<usize>,
    pooled: Range<usize>,
}

/// A store of prompt embeddings, memory-mapped (see the module docs).
pub struct PromptEmbeddings {
    path: PathBuf,
    shards: Vec<Shard>,
    len: usize,
    seq_len: usize,
    dim: usize,
    pooled_dim: usize,
    dtype: Dtype,
    texts: Vec<String>,
    metadata: Vec<Value>,
    negative: (Vec<f32>, Vec<f32>),
    header: BTreeMap<String, String>,
}

impl std::fmt::Debug for PromptEmbeddings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptEmbeddings")
            .field("path", &self.path)
            .field("shards", &self.shards.len())
            .field("len", &self.len)
            .field("seq_len", &self.seq_len)
            .field("dim", &self.dim)
            .field("pooled_dim", &self.pooled_dim)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl PromptEmbeddings {
    /// Open a store: a single `.safetensors` file or an `.index.json` of shards. Given
    /// `FILE.safetensors` that does not exist, its `FILE.safetensors.index.json` is opened, so
    /// the name given to `encode_prompts.py --out` opens either layout.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let name = path.to_string_lossy();
        if name.ends_with(".index.json") {
            return Self::open_index(path);
        }
        if !path.exists() {
            let index = PathBuf::from(format!("{name}.index.json"));
            if index.is_file() {
                return Self::open_index(&index);
            }
            bail!(
                "{}: no such prompt embeddings file (nor {})",
                path.display(),
                index.display()
            );
        }
        let (shard, header, negative) = open_shard(path, 0, None, true)?;
        let negative = negative.ok_or_else(|| {
            anyhow!(
                "{}: has no `{NEG}` and `{NEG_POOLED}` (the empty negative prompt)",
                path.display()
            )
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        Self::finish(path, dir, vec![shard], header, negative)
    }

    fn open_index(index: &Path) -> Result<Self> {
        let bytes = runner::fsutil::read_capped(index, MAX_INDEX)
            .with_context(|| format!("{}: cannot read", index.display()))?
            .ok_or_else(|| {
                anyhow!(
                    "{}: larger than {} MiB: not an index of prompt embedding shards",
                    index.display(),
                    MAX_INDEX >> 20
                )
            })?;
        let doc: Value = serde_json::from_slice(&bytes).map_err(|e| {
            anyhow!(
                "{}: not a JSON index of prompt embedding shards: {e}",
                index.display()
            )
        })?;
        let id = doc
            .pointer("/metadata/encoding_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let list = doc
            .get("shards")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                anyhow!(
                    "{}: needs a non-empty `shards` list of {{file, first_row, rows}}",
                    index.display()
                )
            })?;
        let dir = index.parent().unwrap_or(Path::new(""));
        let mut shards = Vec::with_capacity(list.len());
        let mut first_header = None;
        let mut negative = None;
        let mut next_row = 0usize;
        for (i, entry) in list.iter().enumerate() {
            let what = format!("{}: shard {} of `shards`", index.display(), i + 1);
            let file = entry
                .get("file")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("{what} has no string `file`"))?;
            if file.is_empty() || Path::new(file).is_absolute() || file.contains("..") {
                bail!("{what}: `file` must be a file name beside the index, got {file:?}");
            }
            let first = entry.get("first_row").and_then(Value::as_u64);
            let rows = entry.get("rows").and_then(Value::as_u64);
            let (Some(first), Some(rows)) = (first, rows) else {
                bail!("{what} ({file}) needs integer `first_row` and `rows`");
            };
            if first as usize != next_row {
                bail!(
                    "{what} ({file}) starts at row {first}, but the shards before it end at row \
                     {next_row}"
                );
            }
            let shard_path = dir.join(file);
            if !shard_path.exists() {
                bail!(
                    "{}: shard {file} (rows {first}..{}) is missing: no such file {}",
                    index.display(),
                    first + rows,
                    shard_path.display()
                );
            }
            let (shard, header, neg) =
                open_shard(&shard_path, first as usize, id.as_deref(), i == 0)?;
            if shard.rows as u64 != rows {
                bail!(
                    "{}: holds {} rows but {} lists {rows} for it",
                    shard_path.display(),
                    shard.rows,
                    index.display()
                );
            }
            if i == 0 {
                negative = Some(neg.ok_or_else(|| {
                    anyhow!(
                        "{}: the first shard has no `{NEG}` and `{NEG_POOLED}` (the empty \
                         negative prompt)",
                        shard_path.display()
                    )
                })?);
                first_header = Some(header);
            } else if let (Some(first), Some(s0)) = (&first_header, shards.first()) {
                agree(first, &header, s0, &shard)?;
            }
            next_row += rows as usize;
            shards.push(shard);
        }
        let (Some(header), Some(negative)) = (first_header, negative) else {
            bail!("{}: no shards", index.display());
        };
        Self::finish(index, dir, shards, header, negative)
    }

    fn finish(
        path: &Path,
        dir: &Path,
        shards: Vec<Shard>,
        header: Header,
        negative: (Vec<f32>, Vec<f32>),
    ) -> Result<Self> {
        let len = shards.iter().map(|s| s.rows).sum();
        if let Some(n) = header.meta.get("num_prompts")
            && n.parse::<usize>().ok() != Some(len)
        {
            bail!(
                "{}: the header says num_prompts = {n}, but the files hold {len} rows",
                path.display()
            );
        }
        let sidecar_name = match header.meta.get("sidecar") {
            Some(s) => s.clone(),
            None => {
                let stem = path.file_name().unwrap_or_default().to_string_lossy();
                let stem = stem.trim_end_matches(".index.json");
                let stem = stem.strip_suffix(".safetensors").unwrap_or(stem);
                format!("{stem}.jsonl")
            }
        };
        if sidecar_name.contains('/') || sidecar_name.contains('\\') || sidecar_name.contains("..")
        {
            bail!(
                "{}: `sidecar` must be a file name beside it, got {sidecar_name:?}",
                path.display()
            );
        }
        let (texts, metadata) = read_sidecar(&dir.join(&sidecar_name), len)?;
        Ok(PromptEmbeddings {
            path: path.to_path_buf(),
            len,
            seq_len: header.seq_len,
            dim: header.dim,
            pooled_dim: header.pooled_dim,
            dtype: header.dtype,
            shards,
            texts,
            metadata,
            negative,
            header: header.meta,
        })
    }

    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Tokens per prompt, L (SD3: 77 CLIP + max_sequence_length T5).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
    /// Width of a token, D (SD3: the T5 width, 4096).
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Width of the pooled vector, P (SD3: CLIP-L + CLIP-G projections, 2048).
    pub fn pooled_dim(&self) -> usize {
        self.pooled_dim
    }
    /// The stored element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// What was opened (the file or the index).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Number of files holding the rows.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }
    /// The string metadata of the (first) file's header: `model_dir`, `max_sequence_length`,
    /// `versions`, `encoding_id`, ….
    pub fn header(&self) -> &BTreeMap<String, String> {
        &self.header
    }
    /// The text of prompt `i`. Panics if `i >= len()`, as slice indexing does.
    pub fn text(&self, i: usize) -> &str {
        &self.texts[i]
    }
    /// The metadata of prompt `i` (an object; empty for a plain-text prompt file). Panics if
    /// `i >= len()`.
    pub fn metadata(&self, i: usize) -> &Value {
        &self.metadata[i]
    }

    /// The rows `indices`, in that order (repeats allowed), as f32: (`[n, L, D]`, `[n, P]`)
    /// row-major. An index out of range is an error.
    pub fn rows(&self, indices: &[usize]) -> Result<(Vec<f32>, Vec<f32>)> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len) {
            bail!(
                "{}: row {bad} is out of range: the store holds {} prompts",
                self.path.display(),
                self.len
            );
        }
        let (tok, pool) = (self.seq_len * self.dim, self.pooled_dim);
        let es = self.dtype.size();
        let mut embeds = Vec::with_capacity(indices.len() * tok);
        let mut pooled = Vec::with_capacity(indices.len() * pool);
        for &i in indices {
            let s = &self.shards[self.shards.partition_point(|s| s.first_row + s.rows <= i)];
            let r = i - s.first_row;
            let e = s.embeds.start + r * tok * es;
            self.dtype.extend_f32(&s.map[e..e + tok * es], &mut embeds);
            let p = s.pooled.start + r * pool * es;
            self.dtype.extend_f32(&s.map[p..p + pool * es], &mut pooled);
        }
        Ok((embeds, pooled))
    }

    /// The empty negative prompt: (`[1, L, D]`, `[1, P]`) as f32.
    pub fn negative(&self) -> (Vec<f32>, Vec<f32>) {
        self.negative.clone()
    }
}

/// What a file's header says, checked.
struct Header {
    dtype: Dtype,
    seq_len: usize,
    dim: usize,
    pooled_dim: usize,
    meta: BTreeMap<String, String>,
}

/// Shapes, dtype and encoding of a later shard must be those of the first.
fn agree(first: &Header, h: &Header, s0: &Shard, s: &Shard) -> Result<()> {
    let a = (first.seq_len, first.dim, first.pooled_dim);
    let b = (h.seq_len, h.dim, h.pooled_dim);
    if a != b {
        bail!(
            "{}: shapes disagree with the first shard {}: prompt_embeds [{}, {}, {}] and \
             pooled [{}, {}] here, [_, {}, {}] and [_, {}] there",
            s.path.display(),
            s0.path.display(),
            s.rows,
            b.0,
            b.1,
            s.rows,
            b.2,
            a.0,
            a.1,
            a.2
        );
    }
    if first.dtype != h.dtype {
        bail!(
            "{}: dtype {} differs from the first shard {} ({})",
            s.path.display(),
            h.dtype.name(),
            s0.path.display(),
            first.dtype.name()
        );
    }
    if let (Some(x), Some(y)) = (first.meta.get("encoding_id"), h.meta.get("encoding_id"))
        && x != y
    {
        bail!(
            "{}: belongs to another encoding (encoding_id {y}) than the first shard {} ({x})",
            s.path.display(),
            s0.path.display()
        );
    }
    Ok(())
}

/// Map and check one file holding rows from `first_row`. With `want_id`, its `encoding_id`
/// must be that. Returns the negatives too when `negatives` and the file has them.
#[allow(clippy::type_complexity)]
fn open_shard(
    path: &Path,
    first_row: usize,
    want_id: Option<&str>,
    negatives: bool,
) -> Result<(Shard, Header, Option<(Vec<f32>, Vec<f32>)>)> {
    let p = path.display();
    let file = File::open(path).with_context(|| format!("{p}: cannot open"))?;
    let meta = file
        .metadata()
        .with_context(|| format!("{p}: cannot read its size"))?;
    if !meta.is_file() {
        bail!("{p}: not a file");
    }
    // SAFETY: the map is read-only; the module docs state that files must not change while
    // open (the usual contract of memory-mapped data).
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{p}: cannot map"))?;
    let (tensors, meta) = parse_header(path, &map)?;
    if let Some(f) = meta.get("format")
        && f != FORMAT
    {
        bail!("{p}: format {f:?} is not {FORMAT:?} (written by another encode_prompts.py?)");
    }
    if let (Some(want), Some(got)) = (want_id, meta.get("encoding_id"))
        && want != got
    {
        bail!(
            "{p}: belongs to another encoding (encoding_id {got}) than its index ({want}): a \
             shard from another run"
        );
    }
    for name in tensors.keys() {
        if ![PROMPT, POOLED, NEG, NEG_POOLED].contains(&name.as_str()) {
            bail!(
                "{p}: unexpected tensor `{name}` (a prompt embeddings file holds {PROMPT}, \
                 {POOLED}, {NEG} and {NEG_POOLED})"
            );
        }
    }
    let get = |name: &str| {
        tensors
            .get(name)
            .ok_or_else(|| anyhow!("{p}: has no `{name}` tensor"))
    };
    let emb = get(PROMPT)?;
    let pooled = get(POOLED)?;
    let dtype = emb.dtype;
    for (name, t) in &tensors {
        if t.dtype != dtype {
            bail!(
                "{p}: `{name}` is {} but `{PROMPT}` is {}: one dtype for all",
                t.dtype.name(),
                dtype.name()
            );
        }
    }
    let [rows, seq_len, dim] = emb.shape[..] else {
        bail!(
            "{p}: `{PROMPT}` has shape {:?}, expected [n, L, D]",
            emb.shape
        );
    };
    let [prows, pooled_dim] = pooled.shape[..] else {
        bail!(
            "{p}: `{POOLED}` has shape {:?}, expected [n, P]",
            pooled.shape
        );
    };
    if prows != rows {
        bail!("{p}: `{PROMPT}` has {rows} rows but `{POOLED}` has {prows}");
    }
    if seq_len == 0 || dim == 0 || pooled_dim == 0 {
        bail!(
            "{p}: empty embeddings: `{PROMPT}` {:?}, `{POOLED}` {:?}",
            emb.shape,
            pooled.shape
        );
    }
    for (key, want) in [("first_row", first_row), ("rows", rows)] {
        if let Some(v) = meta.get(key)
            && v.parse::<usize>().ok() != Some(want)
        {
            bail!("{p}: its header says {key} = {v}, but it is read as {key} = {want}");
        }
    }
    let neg = match (tensors.get(NEG), tensors.get(NEG_POOLED)) {
        (Some(n), Some(np)) if negatives => {
            if n.shape != [1, seq_len, dim] || np.shape != [1, pooled_dim] {
                bail!(
                    "{p}: the negative has shapes {:?} and {:?}, expected [1, {seq_len}, {dim}] \
                     and [1, {pooled_dim}]",
                    n.shape,
                    np.shape
                );
            }
            let mut a = Vec::with_capacity(seq_len * dim);
            dtype.extend_f32(&map[n.bytes.clone()], &mut a);
            let mut b = Vec::with_capacity(pooled_dim);
            dtype.extend_f32(&map[np.bytes.clone()], &mut b);
            Some((a, b))
        }
        (None, None) => None,
        (Some(_), Some(_)) => None,
        _ => bail!("{p}: has only one of `{NEG}` and `{NEG_POOLED}`"),
    };
    let shard = Shard {
        path: path.to_path_buf(),
        first_row,
        rows,
        embeds: emb.bytes.clone(),
        pooled: pooled.bytes.clone(),
        map,
    };
    let header = Header {
        dtype,
        seq_len,
        dim,
        pooled_dim,
        meta,
    };
    Ok((shard, header, neg))
}

/// The tensors and string metadata of a safetensors file, every offset checked against the
/// file (byte ranges are absolute positions in `bytes`).
#[allow(clippy::type_complexity)]
fn parse_header(
    path: &Path,
    bytes: &[u8],
) -> Result<(BTreeMap<String, TensorInfo>, BTreeMap<String, String>)> {
    let p = path.display();
    let total = bytes.len() as u64;
    if total < 8 {
        bail!("{p}: {total} bytes, too short to be a safetensors file (damaged or truncated?)");
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    if n > MAX_HEADER || 8 + n > total {
        bail!(
            "{p}: header length {n} does not fit the file ({total} bytes): not a safetensors \
             file, or damaged or truncated"
        );
    }
    let end = 8 + n as usize;
    let doc: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..end])
        .map_err(|e| anyhow!("{p}: the safetensors header is not a JSON object: {e}"))?;
    let data = end..bytes.len();
    let mut tensors = BTreeMap::new();
    let mut meta = BTreeMap::new();
    let mut used = Vec::new();
    for (name, v) in doc {
        if name == "__metadata__" {
            let m = v
                .as_object()
                .ok_or_else(|| anyhow!("{p}: `__metadata__` is not an object"))?;
            for (k, v) in m {
                let s = v
                    .as_str()
                    .ok_or_else(|| anyhow!("{p}: `__metadata__.{k}` is not a string"))?;
                meta.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let bad = |what: &str| anyhow!("{p}: tensor `{name}`: {what}");
        let dt = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no string `dtype`"))?;
        let dtype =
            Dtype::parse(dt).ok_or_else(|| bad(&format!("dtype {dt} is not F16, BF16 or F32")))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect()
            })
            .ok_or_else(|| bad("`shape` is not a list of sizes"))?;
        let offs: Vec<u64> = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .filter(|o: &Vec<u64>| o.len() == 2)
            .ok_or_else(|| bad("`data_offsets` is not [begin, end]"))?;
        let (a, b) = (offs[0], offs[1]);
        let want = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(&format!("shape {shape:?} is too large")))?;
        if a > b || b - a != want {
            bail!(
                "{p}: tensor `{name}`: data_offsets [{a}, {b}] hold {} bytes, but {dt} {shape:?} \
                 needs {want}",
                b.saturating_sub(a)
            );
        }
        let data_len = data.len() as u64;
        if b > data_len {
            bail!(
                "{p}: tensor `{name}` ends at data byte {b} but the file holds {data_len} bytes \
                 of data: damaged or truncated"
            );
        }
        used.push((a, b));
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                bytes: data.start + a as usize..data.start + b as usize,
            },
        );
    }
    used.sort_unstable();
    let mut at = 0u64;
    for (a, b) in &used {
        if *a != at {
            bail!("{p}: tensor data overlaps or leaves a gap at byte {at}: a damaged header");
        }
        at = *b;
    }
    if at != data.len() as u64 {
        bail!(
            "{p}: {} bytes after the last tensor (the header accounts for {at} of {}): damaged, \
             or not written as one piece",
            data.len() as u64 - at,
            data.len()
        );
    }
    Ok((tensors, meta))
}

/// Texts and metadata of the sidecar, which must have exactly `len` rows, indexed in order.
fn read_sidecar(path: &Path, len: usize) -> Result<(Vec<String>, Vec<Value>)> {
    let p = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("{p}: cannot read the prompts sidecar of the embeddings: {e}"))?;
    let mut texts = Vec::with_capacity(len);
    let mut metadata = Vec::with_capacity(len);
    for (lineno, line) in text.lines().enumerate() {
        let lineno = lineno + 1;
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(line)
            .map_err(|e| anyhow!("{p}:{lineno}: not a JSON object: {e}"))?;
        let i = texts.len();
        if row.get("index").and_then(Value::as_u64) != Some(i as u64) {
            bail!(
                "{p}:{lineno}: expected `index` {i} (rows in order from 0), found {}",
                row.get("index")
                    .map_or("none".to_string(), Value::to_string)
            );
        }
        let prompt = row
            .get("prompt")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{p}:{lineno}: no string `prompt`"))?;
        let m = match row.get("metadata") {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(m @ Value::Object(_)) => m.clone(),
            Some(other) => bail!("{p}:{lineno}: `metadata` is {other}, not an object"),
        };
        if i >= len {
            bail!("{p}: more than the {len} rows of the embeddings (line {lineno})");
        }
        texts.push(prompt.to_string());
        metadata.push(m);
    }
    if texts.len() != len {
        bail!(
            "{p}: {} rows, but the embeddings hold {len} prompts",
            texts.len()
        );
    }
    Ok((texts, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_convert_half_floats_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        let mut v = Vec::new();
        Dtype::Bf16.extend_f32(&[0x80, 0x3f, 0x40, 0xc0], &mut v);
        assert_eq!(v, vec![1.0, -3.0]);
    }
}
