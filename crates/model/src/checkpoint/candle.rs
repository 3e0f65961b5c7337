//! Handing layer tensors to candle, the planned compute backend.

use std::collections::HashMap;

use crate::checkpoint::dtype::DType;
use crate::checkpoint::read::{LayerData, TensorView};
use crate::error::{Error, Result};

/// The candle dtype with the same bytes, where candle has one.
fn candle_dtype(dtype: DType) -> Option<candle_core::DType> {
    match dtype {
        DType::U8 => Some(candle_core::DType::U8),
        DType::U32 => Some(candle_core::DType::U32),
        DType::I16 => Some(candle_core::DType::I16),
        DType::I32 => Some(candle_core::DType::I32),
        DType::I64 => Some(candle_core::DType::I64),
        DType::BF16 => Some(candle_core::DType::BF16),
        DType::F16 => Some(candle_core::DType::F16),
        DType::F32 => Some(candle_core::DType::F32),
        DType::F64 => Some(candle_core::DType::F64),
        _ => None,
    }
}

impl TensorView<'_> {
    /// This tensor as a candle `Tensor` on `device`. A float tensor is converted to
    /// `compute` when given (with the same rounding as the workspace); other tensors keep
    /// their dtype. The bytes are copied into candle's own storage, so the tensor outlives
    /// the layer it was read from.
    ///
    /// ```
    /// use memwise_model::{Checkpoint, DType, LayerId, ReadStrategy};
    ///
    /// let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-bert");
    /// let checkpoint = Checkpoint::open(folder)?;
    /// let mut reader = checkpoint.reader(ReadStrategy::default());
    /// let layer = reader.read_layer(&LayerId::Embeddings)?;
    /// let word = layer.get("bert.embeddings.word_embeddings.weight").unwrap();
    /// let tensor = word.to_candle_tensor(Some(DType::F32), &candle_core::Device::Cpu)?;
    /// assert_eq!(tensor.dims(), [16, 8]);
    /// assert_eq!(tensor.dtype(), candle_core::DType::F32);
    /// # Ok::<(), memwise_model::Error>(())
    /// ```
    pub fn to_candle_tensor(
        &self,
        compute: Option<DType>,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        let target = match compute {
            Some(compute) if self.dtype().is_float() && compute.is_float() => compute,
            _ => self.dtype(),
        };
        let candle = candle_dtype(target).ok_or_else(|| Error::Conversion {
            tensor: self.name().to_owned(),
            from: target.to_string(),
            to: "a dtype candle has".into(),
        })?;
        let bytes = self.to_dtype(target)?;
        candle_core::Tensor::from_raw_buffer(&bytes, candle, self.shape(), device).map_err(
            |source| Error::Candle {
                tensor: self.name().to_owned(),
                source: Box::new(source),
            },
        )
    }
}

impl LayerData<'_> {
    /// Every tensor of the layer as candle tensors by name, the map candle-nn's
    /// `VarBuilder::from_tensors` takes. See [`TensorView::to_candle_tensor`].
    pub fn to_candle_tensors(
        &self,
        compute: Option<DType>,
        device: &candle_core::Device,
    ) -> Result<HashMap<String, candle_core::Tensor>> {
        self.tensors()
            .iter()
            .map(|t| Ok((t.name().to_owned(), t.to_candle_tensor(compute, device)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_memwise_and_candle_share_maps() {
        for (ours, theirs) in [
            (DType::U8, candle_core::DType::U8),
            (DType::I64, candle_core::DType::I64),
            (DType::BF16, candle_core::DType::BF16),
            (DType::F64, candle_core::DType::F64),
        ] {
            assert_eq!(candle_dtype(ours), Some(theirs));
            assert_eq!(ours.size_in_bytes(), theirs.size_in_bytes());
        }
        assert_eq!(candle_dtype(DType::Bool), None);
        assert_eq!(candle_dtype(DType::U64), None);
    }
}
