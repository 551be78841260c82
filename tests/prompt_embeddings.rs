//! Prompt embeddings: `scripts/encode_prompts.py` on a tiny random SD3 pipeline
//! (`tests/python/tiny_sd3_pipeline.py`), read back with `nodes::model::text_embeddings` and
//! compared with what diffusers' `encode_prompt` computes in f32 — agreeing to half precision:
//! every element within 1e-2 relative (+1e-6 absolute, for values near 0), where rounding to
//! bf16 alone is at most 2^-8 ≈ 0.39% relative (8 significant bits) and to f16 2^-11 ≈ 0.05%;
//! the largest differences must stay within those bounds (+5% for f32 batch effects). Then bad
//! inputs, each with its message: to the script (a JSONL row without a prompt, a folder without
//! text encoders) and to the reader (missing, truncated and foreign shards, shapes that
//! disagree, wrong dtypes and names, a sidecar that does not match), the reader's cases on
//! stores written here without Python.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{python_with, root, text, tmpdir};
use nodes::model::text_embeddings::PromptEmbeddings;
use serde_json::{Value, json};

/// T5 tokens (short, to keep the tiny stores small): L = 77 CLIP tokens + 16.
const MSL: usize = 16;
/// The tiny pipeline's widths (tests/python/tiny_sd3_pipeline.py): T5 128, CLIP-L 32 + CLIP-G 64.
const L: usize = 77 + MSL;
const D: usize = 128;
const P: usize = 96;

const TEXT_PROMPTS: &str = "a red cat\n\n   two dogs on the left  \na photo of the city at night\n\n\
                            blue square above a green circle\n";
const TEXT_WANT: [&str; 4] = [
    "a red cat",
    "two dogs on the left",
    "a photo of the city at night",
    "blue square above a green circle",
];

/// GenEval-style rows: `prompt` plus metadata passed through.
fn jsonl_rows() -> Vec<Value> {
    vec![
        json!({"prompt": "a photo of a cat", "tag": "single_object",
               "include": [{"class": "cat", "count": 1}]}),
        json!({"prompt": "a photo of two dogs", "tag": "counting",
               "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}),
        json!({"prompt": "a red circle left of a blue square", "tag": "position"}),
        json!({"prompt": "three small triangles", "tag": "counting", "include": []}),
        json!({"prompt": "", "tag": "empty"}),
    ]
}

struct Setup {
    py: PathBuf,
    dir: PathBuf,
    model: PathBuf,
}

/// The tiny pipeline, built once for all the tests of this binary (None: no Python with the
/// packages, outside CI).
fn setup() -> Option<&'static Setup> {
    static S: OnceLock<Option<Setup>> = OnceLock::new();
    S.get_or_init(|| {
        let py = python_with(&["torch", "diffusers", "transformers", "safetensors"])?;
        let dir = tmpdir("prompt-embeddings");
        let model = dir.join("tiny-sd3");
        let o = Command::new(&py)
            .arg(root().join("tests/python/tiny_sd3_pipeline.py"))
            .arg(&model)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        Some(Setup { py, dir, model })
    })
    .as_ref()
}

fn encode(s: &Setup, prompts: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(&s.py)
        .arg(root().join("scripts/encode_prompts.py"))
        .arg(&s.model)
        .arg(prompts)
        .arg("--out")
        .arg(out)
        .args(["--max-sequence-length", &MSL.to_string()])
        .args(extra)
        .output()
        .unwrap()
}

/// diffusers' own embeddings of `prompts` in f32: (prompt_embeds, pooled, negative, negative
/// pooled), flattened.
fn reference(s: &Setup, prompts: &[&str], name: &str) -> [Vec<f32>; 4] {
    let script = r#"
import json, sys, torch
from diffusers import StableDiffusion3Pipeline
model, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
pipe = StableDiffusion3Pipeline.from_pretrained(model, transformer=None, vae=None, dtype=torch.float32)
with torch.inference_mode():
    pe, ne, pp, npool = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=True,
                                           max_sequence_length=int(sys.argv[4]))
assert pe.dtype == torch.float32
for i, t in enumerate([pe, pp, ne[:1], npool[:1]]):
    open(f"{out}.{i}.f32", "wb").write(t.contiguous().numpy().tobytes())
print(json.dumps([list(t.shape) for t in (pe, pp, ne, npool)]))
"#;
    let out = s.dir.join(name);
    let o = Command::new(&s.py)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .args(["-c", script])
        .arg(&s.model)
        .arg(serde_json::to_string(prompts).unwrap())
        .arg(&out)
        .arg(MSL.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let shapes: Vec<Vec<usize>> =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    let n = prompts.len();
    assert_eq!(
        shapes,
        vec![vec![n, L, D], vec![n, P], vec![n, L, D], vec![n, P]]
    );
    std::array::from_fn(|i| {
        fs::read(format!("{}.{i}.f32", out.display()))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// Every element within half precision of the reference (see the module docs); returns the
/// largest relative difference seen (for the report) or the first element that is not.
fn close(got: &[f32], want: &[f32]) -> Result<f32, String> {
    if got.len() != want.len() {
        return Err(format!("{} values, expected {}", got.len(), want.len()));
    }
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d > 1e-2 * w.abs() + 1e-6 || !g.is_finite() {
            return Err(format!("element {i}: {g} vs {w}"));
        }
        if w.abs() > 1e-3 {
            worst = worst.max(d / w.abs());
        }
    }
    Ok(worst)
}

/// The reader's rows, negative, texts and metadata against diffusers.
fn check_store(
    e: &PromptEmbeddings,
    want: &[Vec<f32>; 4],
    texts: &[&str],
    metadata: &[Value],
) -> f32 {
    assert_eq!(e.len(), texts.len());
    assert_eq!((e.seq_len(), e.dim(), e.pooled_dim()), (L, D, P));
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(e.text(i), *t);
        assert_eq!(e.metadata(i), &metadata[i], "metadata of row {i}");
    }
    let all: Vec<usize> = (0..e.len()).collect();
    let (pe, pooled) = e.rows(&all).unwrap();
    let mut worst = close(&pe, &want[0]).unwrap_or_else(|m| panic!("prompt_embeds: {m}"));
    worst = worst.max(close(&pooled, &want[1]).unwrap_or_else(|m| panic!("pooled: {m}")));
    let (neg, neg_pooled) = e.negative();
    worst = worst.max(close(&neg, &want[2]).unwrap_or_else(|m| panic!("negative: {m}")));
    worst = worst.max(close(&neg_pooled, &want[3]).unwrap_or_else(|m| panic!("neg pooled: {m}")));
    // Rows picked in any order, repeated, across shards.
    let pick = [e.len() - 1, 0, e.len() - 1, 1];
    let (pe, pooled) = e.rows(&pick).unwrap();
    for (j, &i) in pick.iter().enumerate() {
        close(
            &pe[j * L * D..(j + 1) * L * D],
            &want[0][i * L * D..(i + 1) * L * D],
        )
        .unwrap_or_else(|m| panic!("row {i} picked at {j}: {m}"));
        close(&pooled[j * P..(j + 1) * P], &want[1][i * P..(i + 1) * P]).unwrap();
    }
    // The comparison tells prompts apart: another prompt's row is far outside the tolerance.
    assert!(close(&pe[..L * D], &want[0][..L * D]).is_err());
    worst
}

#[test]
fn should_read_back_what_encode_prompts_writes_as_diffusers_encodes_it() {
    let Some(s) = setup() else { return };
    // Plain text, blank lines skipped, bf16 (the default), one file.
    let txt = s.dir.join("prompts.txt");
    fs::write(&txt, TEXT_PROMPTS).unwrap();
    let out = s.dir.join("text.safetensors");
    let o = encode(s, &txt, &out, &["--batch", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let e = PromptEmbeddings::open(&out).unwrap();
    assert_eq!(e.num_shards(), 1);
    assert_eq!(e.dtype().name(), "BF16");
    let h = e.header();
    assert_eq!(h["max_sequence_length"], MSL.to_string());
    assert_eq!(h["dtype"], "bf16");
    assert_eq!(h["seq_len"], L.to_string());
    assert_eq!(h["sidecar"], "text.jsonl");
    let versions: Value = serde_json::from_str(&h["versions"]).unwrap();
    assert!(versions["diffusers"].is_string() && versions["torch"].is_string());
    assert_eq!(
        fs::canonicalize(&h["model_dir"]).unwrap(),
        fs::canonicalize(&s.model).unwrap()
    );
    let want = reference(s, &TEXT_WANT, "text-ref");
    let empty = vec![json!({}); TEXT_WANT.len()];
    let worst_bf16 = check_store(&e, &want, &TEXT_WANT, &empty);
    assert!(
        worst_bf16 <= 1.05 * 2f32.powi(-8),
        "bf16 rounding only: {worst_bf16}"
    );

    // JSONL with metadata, f16, sharded: 24 kB a row, so 100KB holds 3 rows (2 shards).
    let rows = jsonl_rows();
    let jsonl = s.dir.join("prompts.jsonl");
    let body: String = rows.iter().map(|r| format!("{r}\n\n")).collect();
    fs::write(&jsonl, body).unwrap();
    let out = s.dir.join("geneval.safetensors");
    let o = encode(
        s,
        &jsonl,
        &out,
        &["--dtype", "f16", "--shard-size", "100KB", "--batch", "2"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out.exists());
    for f in [
        "geneval-00001-of-00002.safetensors",
        "geneval-00002-of-00002.safetensors",
        "geneval.safetensors.index.json",
        "geneval.jsonl",
    ] {
        assert!(s.dir.join(f).is_file(), "{f}");
    }
    // Opened by the --out name or by the index.
    let e = PromptEmbeddings::open(&out).unwrap();
    let by_index = PromptEmbeddings::open(s.dir.join("geneval.safetensors.index.json")).unwrap();
    assert_eq!(by_index.len(), e.len());
    assert_eq!(e.num_shards(), 2);
    assert_eq!(e.dtype().name(), "F16");
    let texts: Vec<&str> = rows.iter().map(|r| r["prompt"].as_str().unwrap()).collect();
    let meta: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut m = r.clone();
            m.as_object_mut().unwrap().remove("prompt");
            m
        })
        .collect();
    assert_eq!(meta[0]["include"][0]["class"], "cat");
    let want = reference(s, &texts, "geneval-ref");
    let worst_f16 = check_store(&e, &want, &texts, &meta);
    assert!(
        worst_f16 <= 1.05 * 2f32.powi(-11),
        "f16 rounding only: {worst_f16}"
    );
    let err = e.rows(&[5]).unwrap_err().to_string();
    assert!(
        err.contains("row 5 is out of range: the store holds 5 prompts"),
        "{err}"
    );
    eprintln!(
        "largest relative difference to diffusers' f32: bf16 {worst_bf16:.2e}, f16 {worst_f16:.2e}"
    );

    // A missing shard, a truncated one, one from another encoding: named, with what is wrong.
    let broken = s.dir.join("broken");
    fs::create_dir_all(&broken).unwrap();
    for f in fs::read_dir(&s.dir).unwrap().flatten() {
        let n = f.file_name().to_string_lossy().to_string();
        if n.starts_with("geneval") {
            fs::copy(f.path(), broken.join(&n)).unwrap();
        }
    }
    let index = broken.join("geneval.safetensors.index.json");
    let second = broken.join("geneval-00002-of-00002.safetensors");
    let bytes = fs::read(&second).unwrap();
    fs::remove_file(&second).unwrap();
    let err = PromptEmbeddings::open(&index).unwrap_err().to_string();
    assert!(
        err.contains("shard geneval-00002-of-00002.safetensors (rows 3..5) is missing"),
        "{err}"
    );
    fs::write(&second, &bytes[..bytes.len() - 1000]).unwrap();
    let err = PromptEmbeddings::open(&index).unwrap_err().to_string();
    assert!(err.contains("geneval-00002-of-00002.safetensors"), "{err}");
    assert!(err.contains("damaged or truncated"), "{err}");
    // The text file's store has another encoding_id (and one row too many, but that comes later).
    fs::copy(s.dir.join("text.safetensors"), &second).unwrap();
    let err = PromptEmbeddings::open(&index).unwrap_err().to_string();
    assert!(
        err.contains("geneval-00002-of-00002.safetensors: belongs to another encoding"),
        "{err}"
    );
}

#[test]
fn should_name_the_line_of_a_jsonl_row_without_a_prompt() {
    let Some(s) = setup() else { return };
    let bad = s.dir.join("bad.jsonl");
    fs::write(
        &bad,
        "{\"prompt\": \"a cat\"}\n\n{\"tag\": \"counting\", \"include\": []}\n",
    )
    .unwrap();
    let o = encode(s, &bad, &s.dir.join("bad.safetensors"), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains(&format!(
            "{}:3: the row has no `prompt` (each row needs a string `prompt`)",
            bad.display()
        )),
        "{msg}"
    );
    assert!(!msg.contains("Traceback"), "{msg}");
    fs::write(&bad, "{\"prompt\": \"a cat\"}\n{\"prompt\": 7}\n").unwrap();
    let msg = text(&encode(s, &bad, &s.dir.join("bad.safetensors"), &[]));
    assert!(msg.contains(":2: `prompt` is 7, not a string"), "{msg}");
    fs::write(&bad, "{\"prompt\": \"a cat\"}\nnot json\n").unwrap();
    let msg = text(&encode(s, &bad, &s.dir.join("bad.safetensors"), &[]));
    assert!(msg.contains(":2: not a JSON object"), "{msg}");
    assert!(!s.dir.join("bad.safetensors").exists());
}

#[test]
fn should_refuse_a_model_folder_that_is_missing_or_has_no_text_encoders() {
    let Some(s) = setup() else { return };
    let txt = s.dir.join("one.txt");
    fs::write(&txt, "a cat\n").unwrap();
    let run = |model: &Path| {
        let o = Command::new(&s.py)
            .arg(root().join("scripts/encode_prompts.py"))
            .arg(model)
            .arg(&txt)
            .arg("--out")
            .arg(s.dir.join("x.safetensors"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        text(&o)
    };
    let nowhere = s.dir.join("no-such-model");
    let msg = run(&nowhere);
    assert!(
        msg.contains(&format!("{}: no such model folder", nowhere.display())),
        "{msg}"
    );
    // A pipeline folder with only a transformer and a VAE.
    let bare = s.dir.join("bare-model");
    fs::create_dir_all(bare.join("vae")).unwrap();
    fs::write(
        bare.join("model_index.json"),
        r#"{"_class_name": "StableDiffusion3Pipeline", "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": [null, null]}"#,
    )
    .unwrap();
    let msg = run(&bare);
    assert!(msg.contains("bare-model: no text encoders in it"), "{msg}");
    // One missing encoder is named.
    let partial = s.dir.join("partial-model");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).unwrap();
    let mut index: Value =
        serde_json::from_str(&fs::read_to_string(s.model.join("model_index.json")).unwrap())
            .unwrap();
    index["text_encoder_3"] = json!([null, null]);
    fs::write(partial.join("model_index.json"), index.to_string()).unwrap();
    for c in [
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    ] {
        fs::create_dir_all(partial.join(c)).unwrap();
    }
    let msg = run(&partial);
    assert!(
        msg.contains("missing text_encoder_3 (T5 text encoder)"),
        "{msg}"
    );
    assert!(!msg.contains("Traceback"), "{msg}");
}

// ---- The reader on stores written here (no Python needed). ----

/// One tensor to write: name, safetensors dtype, shape, little-endian bytes.
struct T(&'static str, &'static str, Vec<usize>, Vec<u8>);

fn f32s(shape: &[usize], f: impl Fn(usize) -> f32) -> Vec<u8> {
    let n: usize = shape.iter().product();
    (0..n).flat_map(|i| f(i).to_le_bytes()).collect()
}

/// A safetensors file as the format says: u64 header length, JSON header, data.
fn write_safetensors(path: &Path, tensors: &[T], meta: &[(&str, String)]) {
    let mut header = serde_json::Map::new();
    let meta: serde_json::Map<String, Value> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut data = Vec::new();
    for T(name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let h = Value::Object(header).to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    fs::write(path, out).unwrap();
}

/// A small f32 store in `dir`: shards of `rows` rows each (with shapes L=3, D=4, P=2 unless
/// `dims` changes a shard's), value of element j of row r = r·100 + j, negatives −(j + 1).
fn small_store(dir: &Path, rows: &[usize], dims: &[(usize, usize, usize)]) -> PathBuf {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let n: usize = rows.iter().sum();
    let mut shards = Vec::new();
    let mut first = 0;
    for (s, &r) in rows.iter().enumerate() {
        let (l, d, p) = dims.get(s).copied().unwrap_or((3, 4, 2));
        let name = format!("small-{:05}-of-{:05}.safetensors", s + 1, rows.len());
        let mut ts = vec![
            T(
                "prompt_embeds",
                "F32",
                vec![r, l, d],
                f32s(&[r, l, d], |i| {
                    ((first + i / (l * d)) * 100 + i % (l * d)) as f32
                }),
            ),
            T(
                "pooled_prompt_embeds",
                "F32",
                vec![r, p],
                f32s(&[r, p], |i| ((first + i / p) * 100 + 50 + i % p) as f32),
            ),
        ];
        if s == 0 {
            ts.push(T(
                "negative_prompt_embeds",
                "F32",
                vec![1, l, d],
                f32s(&[1, l, d], |j| -(j as f32 + 1.0)),
            ));
            ts.push(T(
                "negative_pooled_prompt_embeds",
                "F32",
                vec![1, p],
                f32s(&[1, p], |j| -(j as f32 + 0.5)),
            ));
        }
        let meta = [
            ("format", "flowrun.prompt_embeddings/1".to_string()),
            ("encoding_id", "abc".to_string()),
            ("first_row", first.to_string()),
            ("rows", r.to_string()),
            ("num_prompts", n.to_string()),
            ("sidecar", "small.jsonl".to_string()),
        ];
        write_safetensors(&dir.join(&name), &ts, &meta);
        shards.push(json!({"file": name, "first_row": first, "rows": r}));
        first += r;
    }
    let sidecar: String = (0..n)
        .map(|i| {
            format!(
                "{}\n",
                json!({"index": i, "prompt": format!("prompt {i}"), "metadata": {"k": i}})
            )
        })
        .collect();
    fs::write(dir.join("small.jsonl"), sidecar).unwrap();
    let index = dir.join("small.safetensors.index.json");
    fs::write(
        &index,
        json!({"metadata": {"encoding_id": "abc"}, "shards": shards}).to_string(),
    )
    .unwrap();
    index
}

fn open_err(path: &Path) -> String {
    match PromptEmbeddings::open(path) {
        Ok(e) => panic!("{} should not open: {e:?}", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn should_read_rows_across_shards_exactly() {
    let dir = tmpdir("embeddings-small");
    let index = small_store(&dir, &[2, 3, 1], &[]);
    let e = PromptEmbeddings::open(&index).unwrap();
    assert_eq!(
        (e.len(), e.seq_len(), e.dim(), e.pooled_dim()),
        (6, 3, 4, 2)
    );
    assert_eq!(e.num_shards(), 3);
    assert_eq!(e.text(4), "prompt 4");
    assert_eq!(e.metadata(4), &json!({"k": 4}));
    let (pe, pooled) = e.rows(&[5, 1, 2, 1]).unwrap();
    assert_eq!(pe.len(), 4 * 12);
    for (j, &r) in [5usize, 1, 2, 1].iter().enumerate() {
        let want: Vec<f32> = (0..12).map(|i| (r * 100 + i) as f32).collect();
        assert_eq!(&pe[j * 12..(j + 1) * 12], &want[..], "row {r}");
        assert_eq!(
            &pooled[j * 2..(j + 1) * 2],
            &[(r * 100 + 50) as f32, (r * 100 + 51) as f32]
        );
    }
    let (neg, neg_pooled) = e.negative();
    assert_eq!(neg, (1..=12).map(|j| -(j as f32)).collect::<Vec<_>>());
    assert_eq!(neg_pooled, vec![-0.5, -1.5]);
    assert_eq!(e.rows(&[]).unwrap(), (vec![], vec![]));
    let err = e.rows(&[0, 6]).unwrap_err().to_string();
    assert!(
        err.contains("row 6 is out of range: the store holds 6 prompts"),
        "{err}"
    );
}

#[test]
fn should_refuse_shards_whose_shapes_disagree() {
    let dir = tmpdir("embeddings-shapes");
    let index = small_store(&dir, &[2, 2], &[(3, 4, 2), (3, 5, 2)]);
    let err = open_err(&index);
    assert!(
        err.contains("small-00002-of-00002.safetensors: shapes disagree with the first shard"),
        "{err}"
    );
    assert!(
        err.contains("[2, 3, 5] and pooled [2, 2] here, [_, 3, 4] and [_, 2] there"),
        "{err}"
    );
    // Within one file: pooled rows that do not match the embeddings.
    let one = dir.join("one.safetensors");
    write_safetensors(
        &one,
        &[
            T(
                "prompt_embeds",
                "F32",
                vec![2, 3, 4],
                f32s(&[2, 3, 4], |_| 0.0),
            ),
            T(
                "pooled_prompt_embeds",
                "F32",
                vec![3, 2],
                f32s(&[3, 2], |_| 0.0),
            ),
        ],
        &[],
    );
    let err = open_err(&one);
    assert!(
        err.contains("`prompt_embeds` has 2 rows but `pooled_prompt_embeds` has 3"),
        "{err}"
    );
    write_safetensors(
        &one,
        &[
            T("prompt_embeds", "F32", vec![2, 12], f32s(&[2, 12], |_| 0.0)),
            T(
                "pooled_prompt_embeds",
                "F32",
                vec![2, 2],
                f32s(&[2, 2], |_| 0.0),
            ),
        ],
        &[],
    );
    let err = open_err(&one);
    assert!(
        err.contains("`prompt_embeds` has shape [2, 12], expected [n, L, D]"),
        "{err}"
    );
}

#[test]
fn should_refuse_wrong_dtypes_names_and_damaged_files() {
    let dir = tmpdir("embeddings-bad");
    let p = dir.join("x.safetensors");
    let good = |extra: Option<T>, dtype: &'static str| {
        let es = if dtype == "F32" { 4 } else { 2 };
        let mut ts = vec![
            T("prompt_embeds", dtype, vec![1, 2, 2], vec![0; 4 * es]),
            T("pooled_prompt_embeds", dtype, vec![1, 2], vec![0; 2 * es]),
            T(
                "negative_prompt_embeds",
                dtype,
                vec![1, 2, 2],
                vec![0; 4 * es],
            ),
            T(
                "negative_pooled_prompt_embeds",
                dtype,
                vec![1, 2],
                vec![0; 2 * es],
            ),
        ];
        ts.extend(extra);
        ts
    };
    fs::write(
        dir.join("x.jsonl"),
        "{\"index\": 0, \"prompt\": \"a\", \"metadata\": {}}\n",
    )
    .unwrap();
    write_safetensors(&p, &good(None, "BF16"), &[]);
    assert_eq!(PromptEmbeddings::open(&p).unwrap().len(), 1);
    write_safetensors(&p, &good(None, "I32"), &[]);
    assert!(
        open_err(&p)
            .contains("tensor `negative_pooled_prompt_embeds`: dtype I32 is not F16, BF16 or F32"),
        "{}",
        open_err(&p)
    );
    write_safetensors(
        &p,
        &good(Some(T("text_ids", "F32", vec![1], vec![0; 4])), "F32"),
        &[],
    );
    assert!(
        open_err(&p).contains("unexpected tensor `text_ids`"),
        "{}",
        open_err(&p)
    );
    let mut ts = good(None, "F16");
    ts.remove(1);
    write_safetensors(&p, &ts, &[]);
    assert!(
        open_err(&p).contains("has no `pooled_prompt_embeds` tensor"),
        "{}",
        open_err(&p)
    );
    let mut ts = good(None, "F16");
    ts.truncate(3);
    write_safetensors(&p, &ts, &[]);
    assert!(
        open_err(&p).contains(
            "has only one of `negative_prompt_embeds` and `negative_pooled_prompt_embeds`"
        ),
        "{}",
        open_err(&p)
    );
    let mut ts = good(None, "F16");
    ts[0].1 = "F32";
    ts[0].3 = vec![0; 16];
    write_safetensors(&p, &ts, &[]);
    assert!(
        open_err(&p).contains("is F16 but `prompt_embeds` is F32"),
        "{}",
        open_err(&p)
    );
    write_safetensors(&p, &good(None, "F16"), &[("format", "other/2".into())]);
    assert!(
        open_err(&p).contains("format \"other/2\" is not"),
        "{}",
        open_err(&p)
    );
    // Damaged bytes: garbage, a cut header, trailing bytes, a size that does not match.
    fs::write(&p, b"PK\x03\x04 not safetensors at all").unwrap();
    let err = open_err(&p);
    assert!(
        err.contains("x.safetensors: header length") && err.contains("damaged or truncated"),
        "{err}"
    );
    fs::write(&p, b"abc").unwrap();
    assert!(open_err(&p).contains("3 bytes, too short to be a safetensors file"));
    write_safetensors(&p, &good(None, "F16"), &[]);
    let mut bytes = fs::read(&p).unwrap();
    bytes.extend([0u8; 3]);
    fs::write(&p, &bytes).unwrap();
    assert!(
        open_err(&p).contains("3 bytes after the last tensor"),
        "{}",
        open_err(&p)
    );
    bytes.truncate(bytes.len() - 3 - 2);
    fs::write(&p, &bytes).unwrap();
    assert!(
        open_err(&p).contains("damaged or truncated"),
        "{}",
        open_err(&p)
    );
    bytes[8] = b'[';
    fs::write(&p, &bytes).unwrap();
    assert!(
        open_err(&p).contains("the safetensors header is not a JSON object"),
        "{}",
        open_err(&p)
    );
    let missing = dir.join("nothing.safetensors");
    let err = open_err(&missing);
    assert!(
        err.contains("nothing.safetensors: no such prompt embeddings file (nor "),
        "{err}"
    );
}

#[test]
fn should_refuse_an_index_or_sidecar_that_does_not_match_the_shards() {
    let dir = tmpdir("embeddings-index");
    let index = small_store(&dir, &[2, 2], &[]);
    let sidecar = dir.join("small.jsonl");
    let rows = fs::read_to_string(&sidecar).unwrap();
    let three: String = rows.lines().take(3).map(|l| format!("{l}\n")).collect();
    fs::write(&sidecar, &three).unwrap();
    let err = open_err(&index);
    assert!(
        err.contains("small.jsonl: 3 rows, but the embeddings hold 4 prompts"),
        "{err}"
    );
    fs::write(&sidecar, rows.replace("\"index\":2", "\"index\":7")).unwrap();
    let err = open_err(&index);
    assert!(
        err.contains("small.jsonl:3: expected `index` 2 (rows in order from 0), found 7"),
        "{err}"
    );
    fs::write(
        &sidecar,
        rows.replace("\"prompt\":\"prompt 1\"", "\"prompt\":1"),
    )
    .unwrap();
    assert!(open_err(&index).contains("small.jsonl:2: no string `prompt`"));
    fs::remove_file(&sidecar).unwrap();
    assert!(open_err(&index).contains("small.jsonl: cannot read the prompts sidecar"));
    // The index and the shards disagree.
    let index = small_store(&dir, &[2, 2], &[]);
    let text = fs::read_to_string(&index).unwrap();
    fs::write(
        &index,
        text.replace("\"first_row\":2,\"rows\":2", "\"first_row\":3,\"rows\":2"),
    )
    .unwrap();
    let err = open_err(&index);
    assert!(
        err.contains("starts at row 3, but the shards before it end at row 2"),
        "{err}"
    );
    fs::write(
        &index,
        text.replace("\"first_row\":2,\"rows\":2", "\"first_row\":2,\"rows\":1"),
    )
    .unwrap();
    let err = open_err(&index);
    assert!(
        err.contains("small-00002-of-00002.safetensors: holds 2 rows but"),
        "{err}"
    );
    fs::write(&index, text.replace("\"abc\"", "\"xyz\"")).unwrap();
    let err = open_err(&index);
    assert!(err.contains("small-00001-of-00002.safetensors: belongs to another encoding (encoding_id abc) than its index (xyz)"), "{err}");
    fs::write(&index, text.replace("small-00002", "../small-00002")).unwrap();
    assert!(open_err(&index).contains("`file` must be a file name beside the index"));
    fs::write(&index, "{\"shards\": []}").unwrap();
    assert!(open_err(&index).contains("needs a non-empty `shards` list"));
    fs::write(&index, "{").unwrap();
    assert!(open_err(&index).contains("not a JSON index of prompt embedding shards"));
}
