//! Property test: 10,000 mutated pipeline files go through validation. None may panic; each
//! either passes or gets at least one error, and every error names the file.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

/// xorshift64*: a tiny deterministic generator (no dependency needed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    ":",
    "-",
    " ",
    "  ",
    "\n",
    "{",
    "}",
    "[",
    "]",
    ",",
    "'",
    "\"",
    "#",
    "&a",
    "*a",
    "@",
    ".",
    "$",
    "$t",
    "@prev",
    "@*",
    "@last",
    "0",
    "-1",
    "1e309",
    "nan",
    "true",
    "null",
    "~",
    "id",
    "type",
    "repeat",
    "inputs",
    "params",
    "uses",
    "every",
    "when",
    "count",
    "vars",
    "nodes",
    "sum",
    "constant",
    "noop",
    "accumulate",
    "acc",
    "value",
    "xs",
    "total",
    "\t",
    "!!str",
    "|",
    ">",
    "<<: *a",
    "9999999999999999999999",
    "schedule",
    "cosine",
];

fn mutate(text: &str, rng: &mut Rng) -> String {
    let mut s: Vec<char> = text.chars().collect();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    match rng.below(7) {
        0 if !s.is_empty() => {
            let i = rng.below(s.len());
            let n = 1 + rng.below(8);
            s.drain(i..(i + n).min(s.len()));
            s.into_iter().collect()
        }
        1 => {
            let i = rng.below(s.len() + 1);
            let t = TOKENS[rng.below(TOKENS.len())];
            s.splice(i..i, t.chars());
            s.into_iter().collect()
        }
        2 if lines.len() > 1 => {
            let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
            lines.swap(a, b);
            lines.join("\n")
        }
        3 if !lines.is_empty() => {
            let a = rng.below(lines.len());
            let l = lines[a].clone();
            lines.insert(rng.below(lines.len()), l);
            lines.join("\n")
        }
        4 if !lines.is_empty() => {
            let a = rng.below(lines.len());
            lines[a] = format!("{}{}", " ".repeat(rng.below(6)), lines[a].trim_start());
            lines.join("\n")
        }
        5 if !lines.is_empty() => {
            // Replace one word by a token.
            let a = rng.below(lines.len());
            let words: Vec<&str> = lines[a].split(' ').collect();
            let w = rng.below(words.len());
            let mut ws: Vec<String> = words.iter().map(|x| x.to_string()).collect();
            ws[w] = TOKENS[rng.below(TOKENS.len())].to_string();
            lines[a] = ws.join(" ");
            lines.join("\n")
        }
        _ => {
            if lines.is_empty() {
                return String::new();
            }
            let a = rng.below(lines.len());
            lines.remove(a);
            lines.join("\n")
        }
    }
}

#[test]
fn should_never_panic_on_10000_mutated_pipelines() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines");
    let mut seeds: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".yaml"))
        .map(|e| fs::read_to_string(e.path()).unwrap())
        .collect();
    for extra in ["pipelines"] {
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(extra);
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".yaml") {
                    seeds.push(fs::read_to_string(e.path()).unwrap());
                }
            }
        }
    }
    seeds.sort();
    let reg = nodes::registry();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut ok, mut rejected) = (0, 0);
    for i in 0..10_000 {
        let base = &seeds[i % seeds.len()];
        let mut text = mutate(base, &mut rng);
        for _ in 0..rng.below(3) {
            text = mutate(&text, &mut rng);
        }
        let name = format!("fuzz-{i}.yaml");
        let result = catch_unwind(AssertUnwindSafe(|| {
            runner::load_str(&name, &text, &[], &reg)
        }));
        match result {
            Err(_) => panic!("validation panicked on case {i}:\n{text}"),
            Ok(Ok(_)) => ok += 1,
            Ok(Err(d)) => {
                assert!(
                    d.has_errors(),
                    "case {i}: rejected without an error:\n{text}"
                );
                for e in d.errors() {
                    assert!(
                        e.position().starts_with(&name),
                        "case {i}: error without the file: {e}\n{text}"
                    );
                }
                rejected += 1;
            }
        }
    }
    assert_eq!(ok + rejected, 10_000);
    // The mutations must exercise both outcomes.
    assert!(ok > 100 && rejected > 1000, "ok={ok} rejected={rejected}");
}
