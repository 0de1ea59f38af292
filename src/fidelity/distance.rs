//! The distance between two models' outputs, accumulated batch by batch (so that outputs
//! need not all be in memory): relative L2, mean per-position cosine, and for language
//! models next-token agreement and KL.
use super::Fidelity;
use crate::error::{Error, Result};
use crate::runtime::Value;
use ndarray::{ArrayD, Ix2};

/// Running sums of [`Fidelity`]'s metrics.
#[derive(Debug, Default)]
pub(crate) struct Distance {
    is_lm: bool,
    num: f64,
    den: f64,
    cos_sum: f64,
    positions: usize,
    agree: usize,
    kl_sum: f64,
    lm_pos: usize,
    outputs: Vec<String>,
}

impl Distance {
    /// Sums for outputs of a language model (`lm`: token-id input `input_ids`; its rank-3
    /// outputs are next-token logits) or not.
    pub fn new(lm: bool) -> Self {
        Distance {
            is_lm: lm,
            ..Default::default()
        }
    }

    /// Adds one batch: the float outputs of `a` and `b` of the same name (KV-cache
    /// `present.*` outputs excepted), on the rows `mask` (the batch's `attention_mask`,
    /// `[batch, seq]`) marks as tokens when an output's leading dims are `[batch, seq]` or it
    /// is `[batch·seq, H]`.
    pub fn add(
        &mut self,
        mask: Option<&ArrayD<f32>>,
        a: &[(String, Value)],
        b: &[(String, Value)],
    ) -> Result<()> {
        for (name, va) in a {
            if crate::calib::kv_cache::is_present_output(name) {
                continue;
            }
            let (Value::F32(ya), Some((_, Value::F32(yb)))) =
                (va, b.iter().find(|(n, _)| n == name))
            else {
                continue;
            };
            if ya.shape() != yb.shape() || ya.ndim() == 0 {
                return Err(Error::Usage(format!(
                    "output '{name}' has shape {:?} in the original and {:?} in the rewritten model",
                    ya.shape(),
                    yb.shape()
                )));
            }
            if !self.outputs.contains(name) {
                self.outputs.push(name.clone());
            }
            let last = *ya.shape().last().expect("rank >= 1");
            let rows = ya.len() / last.max(1);
            let ya2 = ya
                .view()
                .into_shape_with_order((rows, last))
                .map_err(|e| Error::Usage(e.to_string()))?;
            let yb2 = yb
                .view()
                .into_shape_with_order((rows, last))
                .map_err(|e| Error::Usage(e.to_string()))?;
            // Which rows are real tokens.
            let keep: Vec<bool> = match mask {
                Some(m)
                    if ya.ndim() >= 3
                        && m.ndim() == 2
                        && ya.shape()[1] == m.shape()[1]
                        && ya.shape()[0] == m.shape()[0] =>
                {
                    let seq = m.shape()[1];
                    let mm = m
                        .view()
                        .into_dimensionality::<Ix2>()
                        .map_err(|e| Error::Usage(e.to_string()))?;
                    let per = rows / (ya.shape()[0] * seq).max(1);
                    (0..rows)
                        .map(|r| mm[[r / per / seq, (r / per) % seq]] != 0.0)
                        .collect()
                }
                // Token rows flattened: `[batch·seq, H]`.
                Some(m) if ya.ndim() == 2 && m.len() == rows => {
                    m.iter().map(|&v| v != 0.0).collect()
                }
                _ => vec![true; rows],
            };
            let lm = self.is_lm && ya.ndim() == 3;
            for (r, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
                let (x, y) = (ya2.row(r), yb2.row(r));
                let (mut d, mut nx, mut ny, mut xy) = (0f64, 0f64, 0f64, 0f64);
                for (&p, &q) in x.iter().zip(y.iter()) {
                    let (p, q) = (f64::from(p), f64::from(q));
                    d += (p - q) * (p - q);
                    nx += p * p;
                    ny += q * q;
                    xy += p * q;
                }
                self.num += d;
                self.den += nx;
                self.cos_sum += if nx > 0.0 && ny > 0.0 {
                    xy / (nx.sqrt() * ny.sqrt())
                } else if nx == ny {
                    1.0
                } else {
                    0.0
                };
                self.positions += 1;
                if lm {
                    let argmax = |v: &ndarray::ArrayView1<f32>| {
                        v.iter()
                            .enumerate()
                            .fold(
                                (0, f32::MIN),
                                |acc, (i, &t)| if t > acc.1 { (i, t) } else { acc },
                            )
                            .0
                    };
                    self.agree += usize::from(argmax(&x) == argmax(&y));
                    let lse = |v: &ndarray::ArrayView1<f32>| {
                        let m = v.iter().copied().fold(f32::MIN, f32::max) as f64;
                        m + v
                            .iter()
                            .map(|&t| (f64::from(t) - m).exp())
                            .sum::<f64>()
                            .ln()
                    };
                    let (la, lb) = (lse(&x), lse(&y));
                    let kl: f64 = x
                        .iter()
                        .zip(y.iter())
                        .map(|(&p, &q)| {
                            let lp = f64::from(p) - la;
                            let lq = f64::from(q) - lb;
                            lp.exp() * (lp - lq)
                        })
                        .sum();
                    self.kl_sum += kl.max(0.0);
                    self.lm_pos += 1;
                }
            }
        }
        Ok(())
    }

    /// Relative L2 of everything added (the absolute L2 when the original is all zeros).
    pub fn rel_l2(&self) -> f64 {
        if self.den > 0.0 {
            (self.num / self.den).sqrt()
        } else {
            self.num.sqrt()
        }
    }

    /// Mean per-position cosine similarity.
    pub fn cosine(&self) -> f64 {
        self.cos_sum / self.positions.max(1) as f64
    }

    /// Whether any value was compared.
    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty() || self.positions == 0
    }

    /// The metrics; `runtime`, `reference` and `samples` describe the run.
    pub fn finish(self, runtime: String, reference: String, samples: usize) -> Result<Fidelity> {
        if self.is_empty() {
            return Err(Error::Usage(
                "the models share no float output to compare".into(),
            ));
        }
        Ok(Fidelity {
            runtime,
            reference,
            samples,
            positions: self.positions,
            rel_l2: self.rel_l2(),
            cosine: self.cosine(),
            outputs: self.outputs,
            top1_agreement: (self.lm_pos > 0).then(|| self.agree as f64 / self.lm_pos as f64),
            kl: (self.lm_pos > 0).then(|| self.kl_sum / self.lm_pos as f64),
            blocks: vec![],
        })
    }
}
