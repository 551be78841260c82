//! Engine overhead per iteration: a 20-node graph of no-op nodes (a chain of 10 and a fan of
//! 10 gathered by a `sum`), run in-process. `cargo bench --bench engine`.

use std::time::Instant;

fn pipeline(iterations: u64) -> String {
    let mut s = format!(
        "name: bench_engine\niterations: {iterations}\nnodes:\n  - id: n0\n    type: noop\n"
    );
    for i in 1..10 {
        s.push_str(&format!(
            "  - id: n{i}\n    type: noop\n    inputs: {{x: n{}.y}}\n",
            i - 1
        ));
    }
    let mut fan = Vec::new();
    for i in 10..19 {
        s.push_str(&format!(
            "  - id: n{i}\n    type: noop\n    inputs: {{x: n0.y}}\n"
        ));
        fan.push(format!("n{i}.y"));
    }
    fan.push("n9.y".into());
    s.push_str(&format!(
        "  - id: n19\n    type: sum\n    inputs: {{xs: [{}]}}\n",
        fan.join(", ")
    ));
    s
}

fn main() {
    let reg = nodes::registry();
    let root = std::env::temp_dir().join(format!("flowrun-bench-engine-{}", std::process::id()));
    let mut per_iter = Vec::new();
    for rep in 0..7 {
        let iterations = 2000;
        let (p, _) =
            runner::load_str("bench.yaml", &pipeline(iterations), &[], &reg).expect("valid");
        assert_eq!(p.nodes.len(), 20);
        let opts = runner::RunOptions {
            runs_root: root.join(format!("r{rep}")),
            ..Default::default()
        };
        let t0 = Instant::now();
        runner::run(p, &reg, opts).expect("runs");
        let us = t0.elapsed().as_secs_f64() * 1e6 / iterations as f64;
        if rep > 0 {
            per_iter.push(us); // the first repetition is warm-up
        }
    }
    per_iter.sort_by(f64::total_cmp);
    let med = per_iter[per_iter.len() / 2];
    println!(
        "engine overhead, 20 no-op nodes: median {med:.1} µs/iteration (min {:.1}, max {:.1}; 6 runs × 2000 iterations, includes the metrics row and run-directory setup)",
        per_iter[0],
        per_iter[per_iter.len() - 1]
    );
    let _ = std::fs::remove_dir_all(&root);
}
