//! Reading auto-round checkpoints: a linear weight stored packed (`qweight`, `qzeros`,
//! `scales`) is read at a quarter to an eighth of its f32 bytes and dequantized into the
//! compute dtype as its stage loads, so the blocks see an ordinary `weight`.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::RunError;
use crate::checkpoint::{Checkpoint, LayerReader};
use crate::quant::{GroupSize, PackingFormat, QuantScheme};

/// The scheme `config.json`'s `quantization_config` describes, if the checkpoint has one;
/// an error naming the key for one memwise cannot read.
pub(super) fn scheme(checkpoint: &Checkpoint) -> Result<Option<QuantScheme>, RunError> {
    let Some(config) = checkpoint.config().raw.get("quantization_config") else {
        return Ok(None);
    };
    let refused = |key: &str, reason: String| RunError::Quantization {
        key: format!("quantization_config.{key}"),
        reason,
    };
    let method = config.get("quant_method").and_then(Value::as_str);
    if method != Some("auto-round") {
        return Err(refused(
            "quant_method",
            format!("{method:?} is not read; memwise reads auto-round checkpoints"),
        ));
    }
    let number = |key: &str| {
        config
            .get(key)
            .and_then(Value::as_i64)
            .ok_or_else(|| refused(key, "missing or not an integer".into()))
    };
    let bits = number("bits")?;
    let group_size = number("group_size")?;
    let sym = config
        .get("sym")
        .and_then(Value::as_bool)
        .ok_or_else(|| refused("sym", "missing or not a boolean".into()))?;
    let bits = u8::try_from(bits).map_err(|_| refused("bits", format!("{bits}")))?;
    let group_size =
        GroupSize::from_auto_round(group_size).map_err(|e| refused("group_size", e.to_string()))?;
    let scheme =
        QuantScheme::new(bits, group_size, sym).map_err(|e| refused("bits", e.to_string()))?;
    if let Some(format) = config.get("packing_format").and_then(Value::as_str) {
        let format =
            PackingFormat::parse(format).map_err(|e| refused("packing_format", e.to_string()))?;
        if format != scheme.packing_format() {
            return Err(refused(
                "packing_format",
                format!("{format} does not match sym = {sym}"),
            ));
        }
    }
    Ok(Some(scheme))
}

/// The module of weight `name` when the checkpoint stores it packed: `X` for `X.weight`
/// where `X.qweight` is there instead.
pub(crate) fn packed_module<'n>(checkpoint: &Checkpoint, name: &'n str) -> Option<&'n str> {
    let module = name.strip_suffix(".weight")?;
    let stored = |part: &str| {
        checkpoint
            .index()
            .get(&format!("{module}.{part}"))
            .is_some()
    };
    (checkpoint.index().get(name).is_none() && stored("qweight")).then_some(module)
}

/// Reads packed weight `name` (`shape` = `[out, in]`) of stage `stage` and dequantizes it
/// into `dtype` on `device`.
pub(super) fn load(
    reader: &mut LayerReader<'_>,
    stage: &str,
    name: &str,
    shape: &[usize],
    scheme: &QuantScheme,
    dtype: DType,
    device: &Device,
) -> Result<Tensor, RunError> {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let parts = ["qweight", "qzeros", "scales"].map(|p| format!("{module}.{p}"));
    let names: Vec<&str> = parts.iter().map(String::as_str).collect();
    let data = reader.read_tensors(Some(stage), &names)?;
    let [qweight, qzeros, scales] = [0, 1, 2].map(|i| &data.tensors()[i]);
    let words = |bytes: &[u8]| -> Vec<i32> {
        bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let halves: Vec<half::f16> = scales
        .bytes()
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
        .collect();
    let bad = |source: crate::quant::Error| RunError::Packed {
        tensor: name.to_owned(),
        source: Box::new(source),
    };
    let &[out_features, in_features] = shape else {
        return Err(bad(crate::quant::Error::Packed(format!(
            "the block expects shape {shape:?}, not a matrix"
        ))));
    };
    let scales_shape: [usize; 2] = match scales.shape() {
        &[groups, out] => [groups, out],
        other => {
            return Err(bad(crate::quant::Error::Packed(format!(
                "scales of shape {other:?}"
            ))))
        }
    };
    if scales_shape[1] != out_features {
        return Err(bad(crate::quant::Error::Packed(format!(
            "{} outputs stored, the block expects {out_features}",
            scales_shape[1]
        ))));
    }
    let packed = crate::quant::PackedWeight::new(
        *scheme,
        words(qweight.bytes()),
        words(qzeros.bytes()),
        halves,
        scales_shape,
    )
    .map_err(bad)?;
    let values = packed.dequantize(in_features).map_err(bad)?;
    drop(data);
    Tensor::from_vec(values, (out_features, in_features), device)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(|source| RunError::Tensor {
            tensor: name.to_owned(),
            source: Box::new(source),
        })
}
