//! `weighted_reward`: `normalise: group` needs the `prompts` input, which names the groups.

use runner::{Diagnostics, Pipeline};

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut d = Diagnostics::default();
    for n in p.nodes.iter().filter(|n| n.ty == "weighted_reward") {
        if n.params.str("normalise").is_ok_and(|v| v == "group")
            && !n.inputs.iter().any(|(port, _)| *port == "prompts")
        {
            d.push(
                n.params
                    .error(
                        "normalise",
                        "`group` needs the `prompts` input: it names each sample's group",
                    )
                    .help("connect `prompts: <prompt_loader>.prompts`"),
            );
        }
    }
    d
}
