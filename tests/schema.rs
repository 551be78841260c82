//! The JSON Schema for editors: the shipped file is what `flowrun schema` prints, and (where
//! Python has jsonschema and PyYAML, as in CI) it accepts every valid pipeline and rejects the
//! invalid ones it can express (unknown keys, types and params; wrong param types).

mod common;
use common::{bin, root, text};

use std::process::Command;

#[test]
fn should_ship_the_schema_that_flowrun_schema_prints() {
    let o = bin().arg("schema").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let shipped: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("pipelines/flowrun.schema.json")).unwrap(),
    )
    .unwrap();
    assert!(
        printed == shipped,
        "pipelines/flowrun.schema.json is stale: run `cargo run --release -- schema > pipelines/flowrun.schema.json`"
    );
    // Every registered node type has a rule for its params.
    let rules = printed["$defs"]["node"]["allOf"].as_array().unwrap();
    assert!(rules.len() >= 20, "{} node rules", rules.len());
    let tafs = rules
        .iter()
        .find(|r| r["if"]["properties"]["type"]["const"] == "annealed_renoiser")
        .expect("annealed_renoiser rule");
    assert!(tafs["then"]["properties"]["params"]["properties"]["tau"].is_object());
}

#[test]
fn should_accept_valid_pipelines_and_reject_invalid_ones() {
    let ok = Command::new("python3")
        .args(["-c", "import jsonschema, yaml"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "NOTICE: python3 with jsonschema and PyYAML not available (pip install jsonschema pyyaml); skipping"
        );
        return;
    }
    let r = root();
    let mut args: Vec<String> = Vec::new();
    for dir in ["pipelines", "tests/pipelines"] {
        for e in std::fs::read_dir(r.join(dir)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.ends_with(".yaml") {
                continue;
            }
            let path = format!("{dir}/{name}");
            if name.starts_with("invalid-") {
                // Errors the schema can express; the rest (cycles, ports, repeat semantics,
                // YAML syntax) only `flowrun validate` finds.
                if ["params", "unknown-type", "resources", "ports"]
                    .iter()
                    .any(|k| name == format!("invalid-{k}.yaml"))
                {
                    args.push(format!("!{path}"));
                }
            } else {
                args.push(path);
            }
        }
    }
    assert!(args.len() >= 10, "{args:?}");
    let o = Command::new("python3")
        .current_dir(&r)
        .arg("tests/python/check_schema.py")
        .arg("pipelines/flowrun.schema.json")
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}
