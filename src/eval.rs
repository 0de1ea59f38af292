//! `smoe-opt eval`: a language model's held-out next-token perplexity and top-1 accuracy.
//!
//! For every sample and position t whose token and next token are both real
//! (`attention_mask` = 1), the prediction at t is scored against `input_ids[t + 1]`:
//! perplexity = exp(mean negative log-likelihood), top-1 = mean [argmax = target].
use crate::calib::slice;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::runtime::Runtime;
use crate::runtime::Value;
use crate::runtime::{candidates, open_in};
use serde::Serialize;

/// Held-out language-model quality.
#[derive(Debug, Clone, Serialize)]
pub struct LmEval {
    /// Runtime used.
    pub runtime: String,
    /// Samples.
    pub samples: usize,
    /// Next-token predictions scored.
    pub predictions: usize,
    /// Mean negative log-likelihood (nats).
    pub nll: f64,
    /// exp(nll).
    pub perplexity: f64,
    /// Top-1 accuracy.
    pub top1: f64,
}

/// Evaluates `model` on `data` (inputs keyed by model input name; needs `input_ids`).
pub fn evaluate(
    model: &Model,
    data: &[(String, Value)],
    rt: Runtime,
    #[cfg(feature = "ort")] ep: crate::runtime::ort::Ep,
    batch: usize,
) -> Result<LmEval> {
    let ids = match data.iter().find(|(n, _)| n == "input_ids") {
        Some((_, Value::I64(a))) if a.ndim() == 2 => a.clone(),
        _ => {
            return Err(Error::Data(
                "eval needs an int64 'input_ids' array [samples, seq]".into(),
            ))
        }
    };
    let mask = data
        .iter()
        .find(|(n, _)| n == "attention_mask")
        .map(|(_, v)| v.to_f32());
    let (n, seq) = (ids.shape()[0], ids.shape()[1]);
    let mut last_err = None;
    for r in candidates(rt) {
        let mut s = match open_in(
            model,
            r,
            #[cfg(feature = "ort")]
            ep,
        ) {
            Ok(s) => s,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        let (mut nll, mut hits, mut count) = (0f64, 0usize, 0usize);
        let mut failed = None;
        for start in (0..n).step_by(batch.max(1)) {
            let end = (start + batch.max(1)).min(n);
            let feed: Vec<(String, Value)> = data
                .iter()
                .filter(|(k, _)| s.inputs().contains(k))
                .map(|(k, v)| (k.clone(), slice(v, start, end)))
                .collect();
            let out = match s.run(&feed) {
                Ok(o) => o,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            let logits = out
                .iter()
                .find_map(|(_, v)| match v {
                    Value::F32(a) if a.ndim() == 3 && a.shape()[..2] == [end - start, seq] => {
                        Some(a)
                    }
                    _ => None,
                })
                .ok_or_else(|| {
                    Error::Data("the model has no [batch, seq, vocab] logits output".into())
                })?;
            let vocab = logits.shape()[2];
            for b in 0..end - start {
                for t in 0..seq.saturating_sub(1) {
                    let real = |p: usize| mask.as_ref().is_none_or(|m| m[[start + b, p]] != 0.0);
                    if !real(t) || !real(t + 1) {
                        continue;
                    }
                    let target = ids[[start + b, t + 1]];
                    if target < 0 || target as usize >= vocab {
                        return Err(Error::Data(format!(
                            "token id {target} is outside the vocabulary of {vocab}"
                        )));
                    }
                    let row: Vec<f64> = (0..vocab).map(|v| f64::from(logits[[b, t, v]])).collect();
                    let m = row.iter().copied().fold(f64::MIN, f64::max);
                    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    nll += lse - row[target as usize];
                    let arg = row
                        .iter()
                        .enumerate()
                        .fold((0, f64::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
                        .0;
                    hits += usize::from(arg == target as usize);
                    count += 1;
                }
            }
        }
        if let Some(e) = failed {
            last_err = Some(e);
            continue;
        }
        if count == 0 {
            return Err(Error::Data("no next-token predictions to score".into()));
        }
        let mean = nll / count as f64;
        return Ok(LmEval {
            runtime: s.runtime().to_string(),
            samples: n,
            predictions: count,
            nll: mean,
            perplexity: mean.exp(),
            top1: hits as f64 / count as f64,
        });
    }
    Err(crate::runtime::last_error(rt, last_err))
}
