//! `prompt_loader`: reads prompts with their structured targets and emits GRPO groups.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use runner::{
    Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, ParamKind, ParamValue, PortDef, Registry,
};

use crate::model::text_embeddings::PromptEmbeddings;
use crate::types::{GroupEmbeddings, Prompt, PromptBatch};
use crate::world::{self, PromptRecord};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "prompt_loader",
        summary: "load prompts and emit P prompts × G samples per iteration",
        doc: "Reads prompts with their structured targets from `path`: JSONL (one\n\
              {\"id\",\"prompt\",\"category\",\"split\",\"target\"} object per line, as in\n\
              datasets/shapes/*.jsonl) or plain text (one prompt per line; the target is parsed\n\
              from the ShapeWorld grammar). Shuffles with the pipeline seed, walks through the\n\
              prompts epoch by epoch (its position is checkpointed), takes `prompts_per_iter`\n\
              prompts per iteration and repeats each `group_size` times (a GRPO group).",
        inputs: vec![],
        outputs: vec![PortDef::new(
            "prompts",
            "prompts",
            "B = P·G samples with tokens and targets",
        )],
        params: vec![
            ParamDef::new("path", ParamKind::Path, "JSONL or text file of ShapeWorld prompts")
                .default(ParamValue::Str(String::new())),
            ParamDef::new(
                "embeddings",
                ParamKind::Path,
                "instead of `path`: prompts encoded by scripts/encode_prompts.py (safetensors + sidecar), for models conditioned on text embeddings",
            )
            .default(ParamValue::Str(String::new())),
            ParamDef::int(
                "prompts_per_iter",
                8,
                1,
                100_000,
                "P: distinct prompts per iteration",
            ),
            ParamDef::int(
                "group_size",
                8,
                1,
                4096,
                "G: samples per prompt (the GRPO group)",
            ),
            ParamDef::boolean("shuffle", true, "shuffle the prompts (each epoch anew)"),
            ParamDef::int(
                "limit",
                0,
                0,
                i64::MAX,
                "use only the first N prompts (0 = all)",
            ),
            ParamDef::new(
                "category",
                ParamKind::Str,
                "keep only this category (e.g. `counting`); empty = all",
            )
            .default(ParamValue::Str(String::new())),
        ],
        resources: vec![],
        factory: |ctx| {
            let p = ctx.params;
            let limit = p.usize("limit")?;
            let category = p.opt_str("category")?;
            let source = match (p.opt_str("path")?, p.opt_str("embeddings")?) {
                (Some(_), Some(_)) => bail!(
                    "set one of `path` (ShapeWorld prompts) and `embeddings` (encoded prompts), not both"
                ),
                (None, None) => bail!(
                    "set `path` (a ShapeWorld prompt file) or `embeddings` (a file written by scripts/encode_prompts.py)"
                ),
                (Some(path), None) => {
                    let mut records = load_prompts(Path::new(path))?;
                    if let Some(cat) = category {
                        records.retain(|r| r.category.as_str() == cat);
                        if records.is_empty() {
                            bail!("no prompt of category `{cat}` in {path}");
                        }
                    }
                    if limit > 0 {
                        records.truncate(limit);
                    }
                    Source::Shapes(records.into_iter().map(Arc::new).collect())
                }
                (None, Some(path)) => Source::embedded(Path::new(path), category, limit)?,
            };
            let per_iter = p.usize("prompts_per_iter")?;
            if !per_iter.is_multiple_of(ctx.world) {
                bail!(
                    "`prompts_per_iter: {per_iter}` does not split evenly over the run's {} \
                     processes (each takes whole prompt groups): make it a multiple of WORLD_SIZE",
                    ctx.world
                );
            }
            Ok(Box::new(PromptLoader {
                source,
                rank: ctx.rank,
                world: ctx.world,
                per_iter,
                group: p.usize("group_size")?,
                shuffle: p.bool("shuffle")?,
                seed: ctx.seed,
                epoch: 0,
                cursor: 0,
                order: Vec::new(),
            }))
        },
    });
}

/// The largest prompt file read (Flow-GRPO's largest prompt sets are a few MiB).
pub const MAX_PROMPT_FILE_BYTES: u64 = 256 << 20;

/// Load prompt records from JSONL or plain text; errors name the file and line.
///
/// Until a line has proven to be a prompt, errors do not quote it: `path` may point at a file that
/// is not a prompt file at all (a typo, `/etc/passwd`), whose content is not ours to print.
pub fn load_prompts(path: &Path) -> Result<Vec<PromptRecord>> {
    // Bounded: `/dev/zero` or a disk image given by mistake must not fill the memory.
    let bytes = runner::fsutil::read_capped(path, MAX_PROMPT_FILE_BYTES)
        .with_context(|| format!("cannot read prompt file {}", path.display()))?;
    let Some(bytes) = bytes else {
        bail!(
            "prompt file {} is larger than {} MiB, the limit for a prompt file (is it the right file?)",
            path.display(),
            MAX_PROMPT_FILE_BYTES >> 20
        );
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "prompt file {} is not UTF-8 text (byte offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let rec = if is_jsonl {
            let r = parse_record(line).map_err(|e| anyhow::anyhow!("{} {e}", at()))?;
            r.target
                .validate()
                .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
            r
        } else {
            parse_prompt(line)
                .map(|target| PromptRecord {
                    id: format!("line-{}", i + 1),
                    prompt: target.prompt(),
                    category: target.category(),
                    split: world::Split::Train,
                    target,
                })
                .map_err(|_| {
                    anyhow::anyhow!(
                        "{} is not a ShapeWorld prompt (a text prompt file holds one prompt per \
                         line, e.g. \"two red circles\", \"a blue square to the left of a green \
                         cross\")",
                        at()
                    )
                })?
        };
        world::tokenize(&rec.prompt).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        out.push(rec);
    }
    if out.is_empty() {
        bail!("{} contains no prompts", path.display());
    }
    Ok(out)
}

/// One JSONL line as a prompt record. The error (to follow "FILE line N") says what is wrong
/// without quoting the line.
fn parse_record(line: &str) -> std::result::Result<PromptRecord, String> {
    use serde_json::Value;
    const FIELDS: &str = "`id`, `prompt`, `category`, `split` and `target`";
    let v: Value = serde_json::from_str(line).map_err(|e| {
        format!(
            "is not JSON (at column {}); a .jsonl prompt file holds one JSON object per line \
             with the fields {FIELDS}",
            e.column()
        )
    })?;
    let Value::Object(fields) = &v else {
        return Err(format!(
            "is not a JSON object with a `prompt` field (a prompt record has the fields {FIELDS})"
        ));
    };
    let categories: Vec<String> = world::Category::ALL
        .iter()
        .map(|c| format!("`{}`", c.as_str()))
        .collect();
    let splits: Vec<String> = world::Split::ALL
        .iter()
        .map(|s| format!("`{}`", s.as_str()))
        .collect();
    fn fits<T: serde::de::DeserializeOwned>(v: &Value) -> bool {
        serde_json::from_value::<T>(v.clone()).is_ok()
    }
    /// A field's name, whether a value fits it, and what it must be.
    type Check = (&'static str, fn(&Value) -> bool, String);
    let checks: [Check; 5] = [
        ("id", fits::<String>, "a string".into()),
        ("prompt", fits::<String>, "a string".into()),
        (
            "category",
            fits::<world::Category>,
            format!("one of {}", categories.join(", ")),
        ),
        (
            "split",
            fits::<world::Split>,
            format!("one of {}", splits.join(", ")),
        ),
        (
            "target",
            fits::<world::Target>,
            "a ShapeWorld target (see datasets/shapes/README.md)".into(),
        ),
    ];
    for (name, ok, what) in &checks {
        match fields.get(*name) {
            None => {
                return Err(format!(
                    "is not a prompt record: it has no `{name}` field (a prompt record has the \
                     fields {FIELDS})"
                ));
            }
            Some(x) if !ok(x) => {
                return Err(format!(
                    "is not a prompt record: its `{name}` is not {what}"
                ));
            }
            Some(_) => {}
        }
    }
    serde_json::from_value(v).map_err(|_| format!("is not a prompt record (fields {FIELDS})"))
}

/// The ShapeWorld target whose canonical prompt is `text` (every valid target is enumerated
/// once; there are a few tens of thousands).
pub fn parse_prompt(text: &str) -> Result<world::Target> {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    use world::{Color, ObjectGroup, Relation, Shape, Target};
    static INDEX: OnceLock<HashMap<String, Target>> = OnceLock::new();
    let index = INDEX.get_or_init(|| {
        let mut groups = Vec::new();
        for shape in Shape::ALL {
            for color in std::iter::once(None).chain(Color::ALL.into_iter().map(Some)) {
                for count in 1..=world::MAX_COUNT {
                    groups.push(ObjectGroup {
                        shape,
                        color,
                        count,
                    });
                }
            }
        }
        let mut m = HashMap::new();
        let mut add = |t: Target| {
            if t.validate().is_ok() {
                m.entry(t.prompt()).or_insert(t);
            }
        };
        for a in &groups {
            add(Target::single(*a));
            for b in &groups {
                add(Target::pair(*a, *b, None));
                for r in Relation::ALL {
                    add(Target::pair(*a, *b, Some(r)));
                }
            }
        }
        m
    });
    let norm = text
        .trim()
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    index.get(&norm).cloned().ok_or_else(|| {
        anyhow::anyhow!("`{text}` is not a ShapeWorld prompt (e.g. \"two red circles\", \"a blue square to the left of a green cross\")")
    })
}

/// Build the batch for `prompts` (each repeated `group` times).
pub fn make_batch(prompts: &[Arc<PromptRecord>], group: usize) -> Result<PromptBatch> {
    let l = world::MAX_TOKENS;
    let mut b = PromptBatch {
        records: Vec::with_capacity(prompts.len() * group),
        group: Vec::new(),
        member: Vec::new(),
        tokens: Vec::new(),
        max_tokens: l,
        embeddings: None,
        sample_offset: 0,
        group_offset: 0,
    };
    for (g, rec) in prompts.iter().enumerate() {
        let toks = world::tokenize(&rec.prompt)
            .map_err(|e| anyhow::anyhow!("prompt `{}`: {e}", rec.id))?;
        let rec = Arc::new(Prompt::from_shapes(rec.clone()));
        for m in 0..group {
            b.records.push(rec.clone());
            b.group.push(g);
            b.member.push(m);
            b.tokens.extend(toks.iter().map(|&t| t as i64));
        }
    }
    Ok(b)
}

/// Where the prompts come from.
enum Source {
    /// ShapeWorld prompts (token ids).
    Shapes(Vec<Arc<PromptRecord>>),
    /// Encoded prompts: the store and the rows in use.
    Embedded {
        store: Arc<PromptEmbeddings>,
        prompts: Vec<Arc<Prompt>>,
    },
}

impl Source {
    fn embedded(path: &Path, category: Option<&str>, limit: usize) -> Result<Source> {
        let store = PromptEmbeddings::open(path)?;
        let mut prompts = embedded_prompts(&store);
        if let Some(c) = category {
            prompts.retain(|p| p.category() == c);
        }
        if let Some(cat) = category
            && prompts.is_empty()
        {
            bail!(
                "no prompt of category `{cat}` (its `category` or `tag`) in {}",
                path.display()
            );
        }
        if prompts.is_empty() {
            bail!("{} holds no prompts", path.display());
        }
        if limit > 0 {
            prompts.truncate(limit);
        }
        Ok(Source::Embedded {
            store: Arc::new(store),
            prompts,
        })
    }

    fn len(&self) -> usize {
        match self {
            Source::Shapes(r) => r.len(),
            Source::Embedded { prompts, .. } => prompts.len(),
        }
    }

    /// The batch of prompts `idx` (positions in this source), each repeated `group` times.
    fn batch(&self, idx: &[usize], group: usize) -> Result<PromptBatch> {
        match self {
            Source::Shapes(r) => {
                let recs: Vec<Arc<PromptRecord>> = idx.iter().map(|&i| r[i].clone()).collect();
                make_batch(&recs, group)
            }
            Source::Embedded { store, prompts } => {
                let chosen: Vec<Arc<Prompt>> = idx.iter().map(|&i| prompts[i].clone()).collect();
                make_embedded_batch(store, &chosen, group)
            }
        }
    }
}

/// Every prompt of an embeddings store, in row order: its text, its metadata, and its id (the
/// metadata's `id`, else the row number as six digits, `000042`).
pub fn embedded_prompts(store: &PromptEmbeddings) -> Vec<Arc<Prompt>> {
    (0..store.len())
        .map(|i| {
            let metadata = match store.metadata(i) {
                serde_json::Value::Object(m) => m.clone(),
                _ => serde_json::Map::new(),
            };
            let id = metadata
                .get("id")
                .and_then(|v| v.as_str())
                .map_or_else(|| format!("{i:06}"), str::to_string);
            Arc::new(Prompt {
                id,
                prompt: store.text(i).to_string(),
                metadata,
                shapes: None,
                embedding_row: Some(i),
            })
        })
        .collect()
}

/// The batch of encoded `prompts` (each repeated `group` times) with their embeddings, one
/// row per prompt, read from `store`.
pub fn make_embedded_batch(
    store: &PromptEmbeddings,
    prompts: &[Arc<Prompt>],
    group: usize,
) -> Result<PromptBatch> {
    let rows: Vec<usize> = prompts
        .iter()
        .map(|p| {
            p.embedding_row.ok_or_else(|| {
                anyhow!("prompt `{}` has no row in {}", p.id, store.path().display())
            })
        })
        .collect::<Result<_>>()?;
    let (prompt_embeds, pooled) = store.rows(&rows)?;
    let (negative_embeds, negative_pooled) = store.negative();
    let mut b = PromptBatch {
        records: Vec::with_capacity(prompts.len() * group),
        group: Vec::new(),
        member: Vec::new(),
        tokens: Vec::new(),
        max_tokens: 0,
        sample_offset: 0,
        group_offset: 0,
        embeddings: Some(Arc::new(GroupEmbeddings {
            prompt_embeds,
            pooled,
            negative_embeds,
            negative_pooled,
            seq_len: store.seq_len(),
            dim: store.dim(),
            pooled_dim: store.pooled_dim(),
            uploaded: Default::default(),
        })),
    };
    for (g, p) in prompts.iter().enumerate() {
        for m in 0..group {
            b.records.push(p.clone());
            b.group.push(g);
            b.member.push(m);
        }
    }
    Ok(b)
}

struct PromptLoader {
    source: Source,
    /// Data-parallel runs: every rank walks the same global order and takes its whole
    /// groups, `per_iter / world` of them.
    rank: usize,
    world: usize,
    per_iter: usize,
    group: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
}

impl PromptLoader {
    fn reorder(&mut self) {
        self.order = (0..self.source.len()).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(
                self.seed ^ self.epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            self.order.shuffle(&mut rng);
        }
    }
    /// Positions (in the source) of the next iteration's prompts.
    fn next_prompts(&mut self) -> Vec<usize> {
        if self.order.is_empty() {
            self.reorder();
        }
        let mut out = Vec::with_capacity(self.per_iter);
        while out.len() < self.per_iter {
            if self.cursor >= self.order.len() {
                self.epoch += 1;
                self.cursor = 0;
                self.reorder();
            }
            out.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        out
    }
}

impl Node for PromptLoader {
    fn run(&mut self, ctx: &NodeCtx, _: &Inputs) -> Result<Outputs> {
        let prompts = self.next_prompts();
        let share = self.per_iter / self.world;
        let first = self.rank * share;
        let mut batch = self
            .source
            .batch(&prompts[first..first + share], self.group)?;
        batch.group_offset = first;
        batch.sample_offset = first * self.group;
        ctx.metric("epoch", self.epoch as f64);
        Ok(Outputs::new().with("prompts", batch))
    }
    fn state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({"epoch": self.epoch, "cursor": self.cursor}))
    }
    fn restore(&mut self, s: serde_json::Value) -> Result<()> {
        self.epoch = s["epoch"]
            .as_u64()
            .context("prompt_loader state: no epoch")?;
        self.cursor = s["cursor"]
            .as_u64()
            .context("prompt_loader state: no cursor")? as usize;
        self.reorder();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(n: usize) -> Vec<Arc<PromptRecord>> {
        world::generate_split(1, world::Split::Train, n)
            .into_iter()
            .map(Arc::new)
            .collect()
    }

    #[test]
    fn should_repeat_each_prompt_group_size_times() {
        let b = make_batch(&recs(3), 4).unwrap();
        assert_eq!(b.len(), 12);
        assert_eq!(b.group, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(b.member[5], 1);
        assert_eq!(b.tokens.len(), 12 * world::MAX_TOKENS);
        assert_eq!(b.records[4].id, b.records[7].id);
    }

    #[test]
    fn should_walk_epochs_deterministically_and_resume_position() {
        let mk = || PromptLoader {
            rank: 0,
            world: 1,
            source: Source::Shapes(recs(5)),
            per_iter: 2,
            group: 1,
            shuffle: true,
            seed: 7,
            epoch: 0,
            cursor: 0,
            order: vec![],
        };
        let mut a = mk();
        let ids: Vec<String> = (0..6)
            .flat_map(|_| a.next_prompts())
            .map(|i| i.to_string())
            .collect();
        // First epoch covers all 5 prompts once.
        let mut first: Vec<_> = ids[..5].to_vec();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), 5);
        // Restoring the position reproduces the continuation.
        let mut b = mk();
        b.next_prompts();
        let st = b.state().unwrap();
        let mut c = mk();
        c.restore(st).unwrap();
        let rest: Vec<String> = (0..5)
            .flat_map(|_| c.next_prompts())
            .map(|i| i.to_string())
            .collect();
        assert_eq!(rest, ids[2..12].to_vec());
    }

    #[cfg(unix)]
    #[test]
    fn should_refuse_an_endless_prompt_file_without_reading_it_all() {
        let e = format!("{:#}", load_prompts(Path::new("/dev/zero")).unwrap_err());
        assert!(e.contains("/dev/zero is larger than 256 MiB"), "{e}");
    }

    #[test]
    fn should_not_quote_lines_of_files_that_are_not_prompt_files() {
        let dir = std::env::temp_dir().join(format!("flowrun-pl-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = "root:x:0:0:SECRET:/root:/bin/bash";
        for (name, text, expected) in [
            (
                "passwd",
                format!("{secret}\n"),
                "passwd line 1 is not a ShapeWorld prompt",
            ),
            (
                "p.jsonl",
                format!("{secret}\n"),
                "p.jsonl line 1 is not JSON (at column 1)",
            ),
            (
                "n.jsonl",
                "[1, 2]\n".to_string(),
                "n.jsonl line 1 is not a JSON object",
            ),
            (
                "o.jsonl",
                format!("{{\"id\": \"a\", \"prompt\": [\"{secret}\"]}}\n"),
                "o.jsonl line 1 is not a prompt record: its `prompt` is not a string",
            ),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", load_prompts(&p).unwrap_err());
            assert!(e.contains(expected), "{e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
    }

    #[test]
    fn should_name_file_and_line_of_bad_prompts() {
        let dir = std::env::temp_dir().join(format!("flowrun-pl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.jsonl");
        std::fs::write(&p, "{\"id\": 1}\n").unwrap();
        let e = format!("{:#}", load_prompts(&p).unwrap_err());
        assert!(e.contains("bad.jsonl line 1"), "{e}");
        let p = dir.join("bad.txt");
        std::fs::write(&p, "a red circle\na purple elephant\n").unwrap();
        let e = format!("{:#}", load_prompts(&p).unwrap_err());
        assert!(e.contains("bad.txt line 2"), "{e}");
        let e = format!(
            "{:#}",
            load_prompts(&dir.join("missing.jsonl")).unwrap_err()
        );
        assert!(e.contains("missing.jsonl"), "{e}");
    }
}
