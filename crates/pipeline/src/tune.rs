//! Fine-tuning the target on a dataset and measuring it: how the demo and `optimsyn analyze`
//! judge data.

use std::collections::BTreeMap;
use std::path::Path;

use optimsyn_data_io::{ChatExample, ChatFormat, ChatTokenizer};
use optimsyn_lm::{CausalLm, DataInfo, LoraAdapter, SftConfig, Trainable, sft};

use crate::config::{Role, RunConfig};
use crate::error::Result;
use crate::models::opts;

/// Loss per subtask (and `all`) on each of `eval_sets` after fine-tuning the target (LoRA) on
/// `data`; `None` data = no SFT.
pub fn finetune_and_eval(
    cfg: &RunConfig,
    data: Option<&[ChatExample]>,
    eval_sets: &[&[ChatExample]],
    dir: &Path,
) -> Result<Vec<BTreeMap<String, f64>>> {
    let tok = ChatTokenizer::from_model_dir(&cfg.models.target)?;
    let fmt = ChatFormat::Tulu;
    let mut target = CausalLm::load(&cfg.models.target, opts(cfg, Role::Target)?)?;
    if let Some(data) = data {
        let train = optimsyn_influence::encode_examples(&tok, data, fmt, cfg.influence.max_len)?;
        let w = &cfg.warmup;
        let lora = w.lora();
        let adapter = LoraAdapter::init(&mut target, lora, cfg.seed)?;
        let scfg = SftConfig {
            lr: w.lr,
            epochs: 2,
            batch_size: w.batch_size,
            seed: cfg.seed,
            ..Default::default()
        };
        sft::train(
            &mut target,
            Trainable::Lora(&adapter),
            &train,
            &scfg,
            &DataInfo::default(),
            dir,
            &mut |_| {},
        )?;
    }
    eval_sets
        .iter()
        .map(|set| {
            let enc = optimsyn_influence::encode_examples(&tok, set, fmt, cfg.influence.max_len)?;
            let r = sft::evaluate(&target, &enc, 4096)?;
            let mut out: BTreeMap<String, f64> =
                r.subtasks.into_iter().map(|(k, g)| (k, g.loss)).collect();
            out.insert("all".into(), r.overall.loss);
            Ok(out)
        })
        .collect()
}
