//! Hostile inputs: files and arguments that are wrong in ways a user would not expect a tool to
//! survive (huge, binary, endless, one 50 KB line, a path to a file that is not ours). Each must
//! give a clear error naming the file, line or argument at fault, never a panic, a library's
//! internal names, or the content of a file that is not a pipeline. The inputs are generated here.

mod common;
use common::{bin, root, text, tmpdir};

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Output;

fn validate(p: &Path, sets: &[&str]) -> Output {
    let mut c = bin();
    c.current_dir(root()).arg("validate").arg(p);
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.output().unwrap()
}

/// Run the tiny TAFS pipeline (tests/pipelines/valid-tafs-tiny.yaml) once with `sets`.
fn run_tiny(dir: &Path, sets: &[String]) -> Output {
    let mut c = bin();
    c.current_dir(root())
        .arg("run")
        .arg("tests/pipelines/valid-tafs-tiny.yaml")
        .arg("--quiet")
        .arg("--runs-dir")
        .arg(dir.join("runs"))
        .args(["--set", "iterations=1"]);
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.output().unwrap()
}

fn assert_clean_failure(o: &Output, out: &str) {
    assert!(!o.status.success(), "{out}");
    assert!(
        !out.contains("panicked") && !out.contains("RUST_BACKTRACE"),
        "{out}"
    );
}

#[test]
fn should_refuse_a_pipeline_file_over_the_size_cap() {
    let dir = tmpdir("hostile-size");
    // 17 MiB of comments before a valid pipeline: over the 16 MiB cap.
    let p = dir.join("big.yaml");
    let mut f = fs::File::create(&p).unwrap();
    let comment = format!("# {}\n", "x".repeat(1021));
    for _ in 0..17 * 1024 {
        f.write_all(comment.as_bytes()).unwrap();
    }
    f.write_all(b"name: big\nnodes: []\n").unwrap();
    drop(f);
    let o = validate(&p, &[]);
    let out = text(&o);
    assert_clean_failure(&o, &out);
    assert!(
        out.contains(&format!(
            "pipeline file {} is larger than 16 MiB",
            p.display()
        )),
        "{out}"
    );
    assert!(
        out.len() < 1000,
        "the error echoes the file: {} bytes",
        out.len()
    );
    // An endless file whose metadata says 0 bytes: stopped at the cap, not read to the end.
    if Path::new("/dev/zero").exists() {
        let t0 = std::time::Instant::now();
        let o = validate(Path::new("/dev/zero"), &[]);
        let out = text(&o);
        assert_clean_failure(&o, &out);
        assert!(
            out.contains("pipeline file /dev/zero is larger than 16 MiB"),
            "{out}"
        );
        assert!(t0.elapsed().as_secs() < 20, "took {:?}", t0.elapsed());
    }
}

#[test]
fn should_cut_a_long_line_around_the_column_in_the_error_excerpt() {
    let dir = tmpdir("hostile-long");
    // One line of about 50 KB with an unknown node type near its end.
    let nodes = |from: usize, to: usize| {
        (from..to)
            .map(|i| format!("{{id: a{i}, type: constant}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let yaml = format!(
        "{{name: long, nodes: [{}, {{id: z, type: nosuch}}, {}]}}\n",
        nodes(0, 1800),
        nodes(1800, 1810)
    );
    assert!(yaml.len() > 50_000);
    let p = dir.join("long.yaml");
    fs::write(&p, &yaml).unwrap();
    let o = validate(&p, &[]);
    let out = text(&o);
    assert_clean_failure(&o, &out);
    assert!(out.contains("unknown node type `nosuch`"), "{out}");
    assert!(out.len() < 1000, "excerpt not cut: {} bytes", out.len());
    // The excerpt is cut on both sides, and the caret stays under `nosuch`.
    let lines: Vec<&str> = out.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with("1 | "))
        .unwrap_or_else(|| panic!("no excerpt line in:\n{out}"));
    let excerpt: Vec<char> = lines[i]["1 | ".len()..].chars().collect();
    let caret: Vec<char> = lines[i + 1]["  | ".len()..].chars().collect();
    assert_eq!(excerpt.first(), Some(&'…'), "{out}");
    assert_eq!(excerpt.last(), Some(&'…'), "{out}");
    let at = caret.iter().position(|&c| c == '^').unwrap();
    let under: String = excerpt[at..at + 6].iter().collect();
    assert_eq!(under, "nosuch", "{out}");
    assert_eq!(caret.iter().filter(|&&c| c == '^').count(), 6, "{out}");
}

#[test]
fn should_say_in_our_words_that_a_pipeline_has_too_many_yaml_nodes() {
    let dir = tmpdir("hostile-nodes");
    let p = dir.join("nodes.yaml");
    let list = vec!["1"; 260_000].join(", ");
    fs::write(&p, format!("name: many\nnodes: []\nvars: [{list}]\n")).unwrap();
    let o = validate(&p, &[]);
    let out = text(&o);
    assert_clean_failure(&o, &out);
    assert!(
        out.contains("the pipeline has more than 250000 YAML nodes"),
        "{out}"
    );
    assert!(out.contains(&format!("{}:3:", p.display())), "{out}");
    assert!(!out.contains("budget") && !out.contains("Nodes {"), "{out}");
}

#[test]
fn should_give_line_column_and_byte_offset_of_invalid_utf8() {
    let dir = tmpdir("hostile-utf8");
    let p = dir.join("latin1.yaml");
    // Line 3 is `# café ` (7 characters, 8 bytes) then a byte that is not UTF-8.
    fs::write(&p, b"name: x\nnodes: []\n# caf\xc3\xa9 \xff\xfe\n").unwrap();
    let o = validate(&p, &[]);
    let out = text(&o);
    assert_clean_failure(&o, &out);
    assert!(
        out.contains(&format!(
            "pipeline file {} is not UTF-8 text: invalid byte 0xFF at line 3, column 8 (byte offset 26)",
            p.display()
        )),
        "{out}"
    );
    assert!(out.contains(&format!("--> {}:3:8", p.display())), "{out}");
    // No excerpt: the file may not be a pipeline at all.
    assert!(!out.contains("3 |"), "{out}");
}

#[test]
fn should_point_errors_caused_by_an_override_at_the_set_argument() {
    let p = root().join("tests/pipelines/valid-tafs-tiny.yaml");
    let o = validate(&p, &["nodes.0.params.x=1"]);
    let out = text(&o);
    assert_clean_failure(&o, &out);
    assert!(
        out.contains("unknown parameter `x` for node `prompts`"),
        "{out}"
    );
    assert!(
        out.contains("--> --set nodes.0.params.x=1, column 22"),
        "{out}"
    );
    assert!(out.contains("  | --set nodes.0.params.x=1\n"), "{out}");
    assert!(out.contains(&format!("  | {}^\n", " ".repeat(21))), "{out}");
    assert!(!out.contains("valid-tafs-tiny.yaml:1:1"), "{out}");
    // A path that leads nowhere is shown at its segment.
    let o = validate(&p, &["nodes.nope.params.x=1"]);
    let out = text(&o);
    assert_clean_failure(&o, &out);
    assert!(out.contains("no item `nope` in this list"), "{out}");
    assert!(
        out.contains("--> --set nodes.nope.params.x=1, column 13"),
        "{out}"
    );
}

#[test]
fn should_not_echo_a_file_that_is_not_a_prompt_file() {
    let dir = tmpdir("hostile-prompts");
    let secret = "root:x:0:0:SECRET-CONTENT:/root:/bin/bash";
    let cases = [
        (
            "passwd",
            format!("{secret}\n"),
            "line 1 is not a ShapeWorld prompt",
        ),
        ("passwd.jsonl", format!("{secret}\n"), "line 1 is not JSON"),
        (
            "object.jsonl",
            format!("\n{{\"user\": \"{secret}\"}}\n"),
            "line 2 is not a prompt record: it has no `id` field",
        ),
        (
            "fields.jsonl",
            format!(
                "{{\"id\": \"a\", \"prompt\": \"a circle\", \"category\": \"{secret}\", \"split\": \"train\", \"target\": {{}}}}\n"
            ),
            "line 1 is not a prompt record: its `category` is not one of `single_object`",
        ),
    ];
    for (name, content, expected) in cases {
        let p = dir.join(name);
        fs::write(&p, content).unwrap();
        let o = run_tiny(
            &dir,
            &[format!("nodes.prompts.params.path={}", p.display())],
        );
        let out = text(&o);
        assert_clean_failure(&o, &out);
        assert!(
            out.contains(&format!("{} {expected}", p.display())),
            "{name}: {out}"
        );
        assert!(!out.contains("SECRET"), "{name} echoed: {out}");
    }
}

#[test]
fn should_say_what_is_wrong_with_a_file_that_is_not_safetensors() {
    let dir = tmpdir("hostile-safetensors");
    let header = br#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let with_len = |len: u64, rest: &[u8]| [&len.to_le_bytes()[..], rest].concat();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "short.safetensors",
            b"abc".to_vec(),
            "its header is truncated (3 bytes",
        ),
        (
            "huge-header.safetensors",
            with_len(1 << 40, b"{}"),
            "its header is too large (the first 8 bytes give a length of 1099511627776 bytes",
        ),
        (
            "cut-header.safetensors",
            with_len(500, br#"{"a":"#),
            "its header is truncated (the first 8 bytes give a length of 500 bytes; the file has 13 bytes)",
        ),
        (
            "extra-data.safetensors",
            [&with_len(header.len() as u64, header)[..], &[0u8; 12]].concat(),
            "its tensor data does not match its header",
        ),
    ];
    let out_file = dir.join("v.safetensors");
    let velocity = |checkpoint: &Path, inputs: &Path| {
        bin()
            .current_dir(root())
            .args(["velocity", "--device", "flex", "--checkpoint"])
            .arg(checkpoint)
            .arg("--inputs")
            .arg(inputs)
            .arg("--out")
            .arg(&out_file)
            .output()
            .unwrap()
    };
    for (name, bytes, expected) in &cases {
        let p = dir.join(name);
        fs::write(&p, bytes).unwrap();
        // As a checkpoint.
        let o = velocity(&p, &p);
        let out = text(&o);
        assert_clean_failure(&o, &out);
        assert!(
            out.contains(&format!(
                "{} is not a safetensors file: {expected}",
                p.display()
            )),
            "{name}: {out}"
        );
        for internal in [
            "HeaderTooLarge",
            "HeaderTooSmall",
            "InvalidHeaderLength",
            "MetadataIncompleteBuffer",
        ] {
            assert!(!out.contains(internal), "{name}: {out}");
        }
    }
    // As `velocity --inputs`, with a real checkpoint.
    let ck = root().join("checkpoints/shapes-small.safetensors");
    assert!(
        ck.is_file(),
        "the shipped checkpoint {} is missing",
        ck.display()
    );
    {
        let p = dir.join("extra-data.safetensors");
        let o = velocity(&ck, &p);
        let out = text(&o);
        assert_clean_failure(&o, &out);
        assert!(
            out.contains(&format!(
                "{} is not a safetensors file: its tensor data does not match its header",
                p.display()
            )),
            "{out}"
        );
    }
}

/// A reward server on 127.0.0.1 that scores the first item of every request `first` and the
/// others 0.5. Serves until the test process ends. Returns its URL.
fn reward_server(first: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let n = request["items"].as_array().map_or(0, Vec::len);
            let scores: Vec<&str> = (0..n).map(|i| if i == 0 { first } else { "0.5" }).collect();
            let reply = format!("{{\"scores\": [{}]}}", scores.join(", "));
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    url
}

#[test]
fn should_report_a_finite_reward_beyond_f32_range_as_sent() {
    let dir = tmpdir("hostile-reward");
    let url = reward_server("1e308");
    let score = "nodes.step.nodes.score";
    let o = run_tiny(
        &dir,
        &[
            format!("{score}.type=http_reward"),
            format!("{score}.params={{url: \"{url}\", batch_size: 8}}"),
            format!("{score}.inputs={{images: predict.x0, prompts: prompts.prompts}}"),
        ],
    );
    let out = text(&o);
    assert_clean_failure(&o, &out);
    assert!(
        out.contains(&format!(
            "reward server {url} returned 1e308 (outside the range of an f32 reward, ±3.4028235e38) for item 0"
        )),
        "{out}"
    );
    assert!(!out.contains("returned inf"), "{out}");
}
