use burn::tensor::Device;

use burn::module::{Module, ModuleVisitor, Param};

use super::*;
use crate::model::checkpoint::tensor_values;
use crate::model::{FlowModelConfig, VelocityModel};

#[test]
fn should_match_paths_as_peft_does() {
    assert!(matches("transformer_blocks.0.attn.to_q", "attn.to_q"));
    assert!(matches("transformer_blocks.0.attn.to_q", "to_q"));
    assert!(matches(
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_q"
    ));
    assert!(!matches("transformer_blocks.0.attn.to_qk", "to_q"));
    assert!(!matches("transformer_blocks.0.attn2.to_q", "attn.to_q"));
    assert!(matches(
        "transformer_blocks.10.attn.to_out.0",
        "*.attn.to_out.0"
    ));
    assert!(matches("transformer_blocks.3.attn2.to_q", "attn*.to_q"));
    assert!(!matches("to_q", "attn.to_q"));
}

#[test]
fn should_reject_bad_settings_together() {
    let mut c = LoraConfig::new(0, -1.0);
    c.dropout = 0.1;
    c.targets = vec!["attn..to_q".into()];
    let e = format!("{:#}", c.validate().unwrap_err());
    for part in ["`rank`", "`alpha`", "`dropout`", "attn..to_q"] {
        assert!(e.contains(part), "{e}");
    }
    let e = LoraConfig::from_json(&serde_json::json!({"rank": 4, "rnak": 2})).unwrap_err();
    assert!(format!("{e}").contains("rnak"), "{e}");
    assert_eq!(
        LoraConfig::from_json(&serde_json::Value::Null).unwrap(),
        None
    );
}

/// Every parameter non-zero (the fresh UNet's zero-initialised outputs would hide adapters).
struct Fill(u64);

impl burn::module::ModuleMapper for Fill {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, t, mapper) = param.consume();
        let shape = t.shape();
        let n = shape.num_elements();
        self.0 += 1;
        let k = self.0 as f32;
        let v: Vec<f32> = (0..n)
            .map(|i| 0.2 * ((i as f32 + k) * 0.37).sin())
            .collect();
        let t = Tensor::from_data(TensorData::new(v, shape), &t.device());
        Param::from_mapped_value(id, t, mapper)
    }
}

fn unet() -> crate::model::FlowModel {
    FlowModelConfig::tiny(crate::world::vocab_size(), crate::world::MAX_TOKENS)
        .with_seed(3)
        .init(&Device::flex())
        .map(&mut Fill(0))
}

fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn should_freeze_the_base_and_adapt_only_the_targets() {
    let cfg = LoraConfig::new(2, 4.0);
    let (mut m, adapted) = attach(unet(), &cfg, crate::model::FlowModel::LORA_TARGETS, 7).unwrap();
    assert!(!adapted.is_empty());
    assert!(adapted.iter().all(|p| p.contains("attn.")), "{adapted:?}");
    let trainable = trainable_paths(&m.clone().train());
    assert_eq!(trainable.len(), 2 * adapted.len(), "{trainable:?}");
    assert!(
        trainable
            .iter()
            .all(|p| p.ends_with("lora_A.weight") || p.ends_with("lora_B.weight"))
    );
    for (_, r, s) in adapted_layers(&mut m) {
        assert_eq!((r, s), (2, 2.0));
    }
}

#[test]
fn should_start_as_the_base_and_detach_to_it() {
    let base = unet();
    let cfg = LoraConfig::new(3, 3.0);
    let (m, _) = attach(base.clone(), &cfg, crate::model::FlowModel::LORA_TARGETS, 1).unwrap();
    let dev = Device::flex();
    let x = crate::model::tensor_from_vec(
        (0..2 * 3 * 16 * 16)
            .map(|i| (i as f32 * 0.01).sin())
            .collect(),
        [2, 3, 16, 16],
        &dev,
    );
    let t = Tensor::<1>::from_floats([0.3, 0.8], &dev);
    let cond = crate::model::Conditioning::Tokens(crate::model::int_tensor_from_vec(
        vec![1; 2 * crate::world::MAX_TOKENS],
        [2, crate::world::MAX_TOKENS],
        &dev,
    ));
    let v0 = tensor_values(base.velocity(x.clone(), t.clone(), &cond).unwrap());
    // B = 0: the adapted model is the base.
    assert!(v0.iter().any(|v| *v != 0.0));
    assert!(same(
        &tensor_values(m.velocity(x.clone(), t.clone(), &cond).unwrap()),
        &v0
    ));
    // Non-zero B: different; detached: the base again, exactly.
    let mut m = m;
    m.each_linear("", &mut |_, lin| {
        if let Some(b) = &mut lin.lora_B {
            let [r, o] = b.weight.dims();
            b.weight = Param::from_tensor(Tensor::ones([r, o], &dev).mul_scalar(0.1));
        }
    });
    let v1 = tensor_values(m.velocity(x.clone(), t.clone(), &cond).unwrap());
    assert!(!same(&v1, &v0));
    let merged = tensor_values(
        merge(m.clone())
            .velocity(x.clone(), t.clone(), &cond)
            .unwrap(),
    );
    for (a, b) in merged.iter().zip(&v1) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    assert!(same(
        &tensor_values(detach(m).velocity(x, t, &cond).unwrap()),
        &v0
    ));
}

#[test]
fn should_name_targets_that_match_nothing() {
    let cfg = LoraConfig::new(2, 2.0).with_targets(&["attn.qkv", "attn.to_q"]);
    let e = attach(unet(), &cfg, &[], 0).unwrap_err();
    let e = format!("{e}");
    assert!(
        e.contains("`attn.to_q`") && !e.contains("`attn.qkv`"),
        "{e}"
    );
    assert!(e.contains("named like"), "{e}");
}

/// Every parameter's values by path.
fn params(m: &crate::model::FlowModel) -> std::collections::BTreeMap<String, Vec<u32>> {
    struct V {
        path: Vec<String>,
        out: std::collections::BTreeMap<String, Vec<u32>>,
    }
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let v = tensor_values(p.val().detach());
            self.out
                .insert(self.path.join("."), v.iter().map(|x| x.to_bits()).collect());
        }
    }
    let mut v = V {
        path: Vec::new(),
        out: Default::default(),
    };
    m.visit(&mut v);
    v.out
}

fn fm_batch(
    seed: u64,
    dev: &Device,
) -> (Tensor<4>, Tensor<4>, Tensor<1>, crate::model::Conditioning) {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (b, n) = (4, 4 * 3 * 16 * 16);
    let x0 = crate::model::sample_standard_normal(&mut rng, n);
    let noise = crate::model::sample_standard_normal(&mut rng, n);
    let t = crate::model::sample_logit_normal(&mut rng, b, 0.0, 1.0);
    let l = crate::world::MAX_TOKENS;
    let tokens: Vec<i64> = (0..b * l).map(|i| (1 + i % 7) as i64).collect();
    (
        crate::model::tensor_from_vec(x0, [b, 3, 16, 16], dev),
        crate::model::tensor_from_vec(noise, [b, 3, 16, 16], dev),
        crate::model::tensor_from_vec(t, [b], dev),
        crate::model::Conditioning::Tokens(crate::model::int_tensor_from_vec(tokens, [b, l], dev)),
    )
}

fn lora_trainer() -> crate::model::Trainer<crate::model::FlowModel> {
    let cfg = LoraConfig::new(2, 4.0);
    let (m, _) = attach(unet(), &cfg, crate::model::FlowModel::LORA_TARGETS, 9).unwrap();
    crate::model::Trainer::from_model(m, crate::model::TrainerConfig::new().with_lr(1e-3))
}

#[test]
fn should_train_only_the_adapters_and_keep_the_base_bit_identical() {
    let dev = Device::flex();
    let mut tr = lora_trainer();
    let before = params(&tr.model().valid());
    for s in 0..2 {
        let (x0, noise, t, cond) = fm_batch(s, &dev);
        tr.flow_matching_step(x0, noise, t, cond).unwrap();
    }
    let after = params(&tr.model().valid());
    let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    assert!(!changed.is_empty());
    for k in before.keys() {
        let adapter = k.ends_with("lora_A.weight") || k.ends_with("lora_B.weight");
        if !adapter {
            assert!(before[k] == after[k], "base parameter {k} changed");
        }
    }
    // Every lora_B moved from zero; nothing else but adapters did.
    assert!(changed.iter().all(|k| k.contains(".lora_")), "{changed:?}");
    assert!(
        before
            .keys()
            .filter(|k| k.ends_with("lora_B.weight"))
            .all(|k| changed.contains(&k)),
        "{changed:?}"
    );
}

#[test]
fn should_resume_a_lora_state_over_its_base_exactly() {
    let dev = Device::flex();
    let mut a = lora_trainer();
    let (x0, noise, t, cond) = fm_batch(1, &dev);
    a.flow_matching_step(x0, noise, t, cond).unwrap();
    let dir = std::env::temp_dir().join(format!("flowrun-lora-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trainer.safetensors");
    a.save_state(&path).unwrap();
    // Only adapters, their EMA and their moments are in the file: no base tensor.
    let file = crate::model::checkpoint::SafetensorsFile::read(&path).unwrap();
    let names: Vec<&str> = file.names().collect();
    assert!(!names.is_empty());
    assert!(names.iter().all(|n| n.contains(".lora_")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("adam.m.")));
    assert!(names.iter().any(|n| n.starts_with("ema.")));
    // Without its base, a clear refusal.
    let Err(e) = crate::model::Trainer::<crate::model::FlowModel>::load_state(&path, &dev) else {
        panic!("a LoRA state loaded without its base");
    };
    assert!(
        format!("{e}").contains("only the trained parameters"),
        "{e}"
    );

    // Over a freshly built policy (base + fresh adapters), the next step is the same.
    let mut b =
        crate::model::Trainer::load_state_over(&path, lora_trainer().model().valid()).unwrap();
    let (x0, noise, t, cond) = fm_batch(2, &dev);
    let sa = a
        .flow_matching_step(x0.clone(), noise.clone(), t.clone(), cond.clone())
        .unwrap();
    let sb = b.flow_matching_step(x0, noise, t, cond).unwrap();
    assert_eq!(sa, sb);
    assert!(params(&a.model().valid()) == params(&b.model().valid()));
    assert!(params(&a.ema()) == params(&b.ema()));
    std::fs::remove_dir_all(&dir).unwrap();
}
