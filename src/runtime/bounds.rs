//! Index inputs checked before a run: a graph input used (through casts and reshapes) as the
//! indices of a `Gather` over a constant table (token ids into the embedding) must lie inside
//! the table. tract panics on an index out of range and onnxruntime reports it deep inside a
//! node; this names the input, the value and the table instead.
use super::Value;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::moe::consts::const_dims;
use crate::moe::view::View;

/// Per graph input: the size of the table axis it indexes, and the table's name.
#[derive(Debug, Clone, Default)]
pub struct IndexBounds(Vec<(String, i64, String)>);

const THROUGH: &[&str] = &[
    "Cast",
    "Identity",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
];

impl IndexBounds {
    /// Finds the index inputs of `g` and their bounds.
    pub fn of(g: &Graph) -> Self {
        let v = View::new(g);
        let mut out = Vec::new();
        for input in g.inputs() {
            let name = input.name.clone().unwrap_or_default();
            let mut frontier = vec![name.clone()];
            let mut seen = 0;
            while let Some(val) = frontier.pop() {
                seen += 1;
                if seen > 64 {
                    break;
                }
                for &c in v.consumers(&val) {
                    let op = v.op(c);
                    if THROUGH.contains(&op) && v.input(c, 0) == val {
                        frontier.push(v.output(c, 0).to_string());
                    } else if op == "Gather" && v.input(c, 1) == val {
                        let table = v.input(c, 0);
                        let Some(dims) = const_dims(g, table) else {
                            continue;
                        };
                        let axis = v.attr_int(c, "axis").unwrap_or(0);
                        let axis = if axis < 0 {
                            axis + dims.len() as i64
                        } else {
                            axis
                        };
                        if let Some(&size) = usize::try_from(axis).ok().and_then(|a| dims.get(a)) {
                            out.push((name.clone(), size, table.to_string()));
                        }
                    }
                }
            }
        }
        IndexBounds(out)
    }

    /// Refuses `inputs` whose index values fall outside a table they index.
    pub fn check(&self, inputs: &[(String, Value)]) -> Result<()> {
        for (name, size, table) in &self.0 {
            let Some((_, Value::I64(a))) = inputs.iter().find(|(n, _)| n == name) else {
                continue;
            };
            if let Some(&bad) = a.iter().find(|&&i| i < -size || i >= *size) {
                return Err(Error::Data(format!(
                    "input '{name}' holds {bad}, outside the {size} rows of '{table}' it indexes \
                     (token ids from another tokenizer or vocabulary?)"
                )));
            }
        }
        Ok(())
    }
}
