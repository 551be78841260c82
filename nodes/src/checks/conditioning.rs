//! Prompts and policy must speak the same conditioning: ShapeWorld prompts (token ids) for the
//! UNet, encoded prompts (`embeddings`) for SD3, and the embeddings as wide as the transformer
//! reads them (`joint_attention_dim`, `pooled_projection_dim`).

use std::path::Path;

use runner::{Diagnostics, Pipeline};

use crate::model::sd3::{Sd3Config, read_config};
use crate::model::text_embeddings::PromptEmbeddings;

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut diags = Diagnostics::default();
    let policies: Vec<_> = super::flow_models(p).collect();
    for n in p.nodes.iter().filter(|n| n.ty == "prompt_loader") {
        let embeddings = n.params.opt_str("embeddings").ok().flatten();
        let path = n.params.opt_str("path").ok().flatten();
        if path.is_some() == embeddings.is_some() {
            diags.push(n.params.error(
                if path.is_some() { "embeddings" } else { "path" },
                "set one of `path` (ShapeWorld prompts) and `embeddings` (a file written by \
                 scripts/encode_prompts.py)",
            ));
            continue;
        }
        for r in &policies {
            let arch = r.params.str("arch").unwrap_or("shapes_unet");
            match (arch, embeddings) {
                ("sd3", None) => diags.push(n.params.error(
                    "path",
                    format!(
                        "the `sd3` model `{}` reads text embeddings: give this loader \
                         `embeddings` (a file written by scripts/encode_prompts.py) instead of \
                         ShapeWorld prompts",
                        r.name
                    ),
                )),
                ("sd3", Some(emb)) => {
                    let Some(dir) = r.params.opt_str("diffusers").ok().flatten() else {
                        continue; // a flowrun checkpoint: checked when it loads
                    };
                    // Missing or broken files are reported when the run builds its resources.
                    let (Ok((config_path, cfg)), Ok(store)) =
                        (read_config(Path::new(dir)), PromptEmbeddings::open(emb))
                    else {
                        continue;
                    };
                    let model = format!("`{}` ({})", r.name, config_path.display());
                    if let Some(msg) = width_mismatch(emb, &store, &model, &cfg) {
                        diags.push(n.params.error("embeddings", msg));
                    }
                }
                (_, Some(_)) => diags.push(n.params.error(
                    "embeddings",
                    format!(
                        "`{}` is ShapeWorld's UNet (`arch: {arch}`), which reads token ids: give \
                         this loader `path` (ShapeWorld prompts), or set `arch: sd3`",
                        r.name
                    ),
                )),
                _ => {}
            }
        }
    }
    diags
}

/// Why the prompt embeddings `store` (named `emb` in the message) cannot condition the SD3
/// transformer `config` (`model` describes it, e.g. "`policy` (models/x/transformer/config.json)"):
/// their widths are not its `joint_attention_dim` / `pooled_projection_dim`. `None` when they fit.
pub fn width_mismatch(
    emb: &str,
    store: &PromptEmbeddings,
    model: &str,
    config: &Sd3Config,
) -> Option<String> {
    let (d, q) = (store.dim(), store.pooled_dim());
    (d != config.joint_attention_dim || q != config.pooled_projection_dim).then(|| {
        format!(
            "{emb} holds embeddings of width {d} (pooled {q}), but the transformer of {model} \
             reads joint_attention_dim {} (pooled_projection_dim {}): encode the prompts with \
             this model's text encoders",
            config.joint_attention_dim, config.pooled_projection_dim
        )
    })
}
