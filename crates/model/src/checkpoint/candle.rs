//! Handing layer tensors to candle, the planned compute backend.

use std::collections::HashMap;

use crate::checkpoint::dtype::StoredDType;
use crate::checkpoint::read::{LayerData, TensorView};
use crate::error::{Error, Result};

/// The candle dtype with the same bytes, where candle has one.
fn candle_dtype(dtype: StoredDType) -> Option<candle_core::DType> {
    match dtype {
        StoredDType::U8 => Some(candle_core::DType::U8),
        StoredDType::U32 => Some(candle_core::DType::U32),
        StoredDType::I16 => Some(candle_core::DType::I16),
        StoredDType::I32 => Some(candle_core::DType::I32),
        StoredDType::I64 => Some(candle_core::DType::I64),
        StoredDType::BF16 => Some(candle_core::DType::BF16),
        StoredDType::F16 => Some(candle_core::DType::F16),
        StoredDType::F32 => Some(candle_core::DType::F32),
        StoredDType::F64 => Some(candle_core::DType::F64),
        _ => None,
    }
}

/// The stored dtype a candle dtype is written as: the inverse of [`candle_dtype`]. `None`
/// for candle's 8-, 6- and 4-bit floats, which no format memwise writes stores.
pub(crate) fn stored_dtype(dtype: candle_core::DType) -> Option<StoredDType> {
    super::dtype::ALL
        .into_iter()
        .find(|&stored| candle_dtype(stored) == Some(dtype))
}

/// The elements of `tensor` (named `name` in errors) as little-endian bytes, with the stored
/// dtype they are in. A dtype memwise cannot store is an error naming the tensor, never a
/// silent conversion.
pub(crate) fn tensor_bytes(
    name: &str,
    tensor: &candle_core::Tensor,
) -> Result<(StoredDType, Vec<u8>)> {
    use candle_core::DType as C;
    let candle = |source| Error::Candle {
        tensor: name.to_owned(),
        source: Box::new(source),
    };
    let flat = tensor.flatten_all().map_err(candle)?;
    macro_rules! le_bytes {
        ($stored:ident, $t:ty) => {
            (
                StoredDType::$stored,
                flat.to_vec1::<$t>()
                    .map_err(candle)?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            )
        };
    }
    Ok(match tensor.dtype() {
        C::U8 => le_bytes!(U8, u8),
        C::U32 => le_bytes!(U32, u32),
        C::I16 => le_bytes!(I16, i16),
        C::I32 => le_bytes!(I32, i32),
        C::I64 => le_bytes!(I64, i64),
        C::F16 => le_bytes!(F16, half::f16),
        C::BF16 => le_bytes!(BF16, half::bf16),
        C::F32 => le_bytes!(F32, f32),
        C::F64 => le_bytes!(F64, f64),
        other => {
            return Err(Error::Conversion {
                tensor: name.to_owned(),
                from: format!("candle {other:?}"),
                to: "a dtype checkpoints store (integers, f16, bf16, f32, f64)".into(),
            })
        }
    })
}

impl TensorView<'_> {
    /// This tensor as a candle `Tensor` on `device`. A float tensor is converted to
    /// `compute` when given (with the same rounding as the workspace); other tensors keep
    /// their dtype. The bytes are copied into candle's own storage, so the tensor outlives
    /// the layer it was read from.
    ///
    /// ```
    /// use memwise_model::{Checkpoint, ReadStrategy};
    /// use memwise_model::checkpoint::StoredDType;
    ///
    /// let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-bert");
    /// let checkpoint = Checkpoint::open(folder)?;
    /// let mut reader = checkpoint.reader(ReadStrategy::default());
    /// let layer = reader.read_stage("bert.embeddings.word_embeddings")?;
    /// let word = layer.get("bert.embeddings.word_embeddings.weight").unwrap();
    /// let tensor = word.to_candle_tensor(Some(StoredDType::F32), &candle_core::Device::Cpu)?;
    /// assert_eq!(tensor.dims(), [16, 8]);
    /// assert_eq!(tensor.dtype(), candle_core::DType::F32);
    /// # Ok::<(), memwise_model::Error>(())
    /// ```
    pub fn to_candle_tensor(
        &self,
        compute: Option<StoredDType>,
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
        let candle_error = |source| Error::Candle {
            tensor: self.name().to_owned(),
            source: Box::new(source),
        };
        if target == StoredDType::F32 && self.dtype() != StoredDType::F32 {
            // Widened straight into the storage candle takes over, not through bytes.
            let values = self.to_f32_vec()?;
            return candle_core::Tensor::from_vec(values, self.shape(), device)
                .map_err(candle_error);
        }
        let bytes = self.to_dtype(target)?;
        candle_core::Tensor::from_raw_buffer(&bytes, candle, self.shape(), device)
            .map_err(candle_error)
    }
}

impl LayerData<'_> {
    /// Every tensor of the layer as candle tensors by name, the map candle-nn's
    /// `VarBuilder::from_tensors` takes. See [`TensorView::to_candle_tensor`].
    pub fn to_candle_tensors(
        &self,
        compute: Option<StoredDType>,
        device: &candle_core::Device,
    ) -> Result<HashMap<String, candle_core::Tensor>> {
        self.tensors()
            .iter()
            .map(|t| Ok((t.name().to_owned(), t.to_candle_tensor(compute, device)?)))
            .collect()
    }
}

impl crate::checkpoint::Checkpoint {
    /// Reads the named tensors, as stage `stage` reads them (see
    /// [`LayerReader::read_tensors`](crate::checkpoint::LayerReader::read_tensors)), straight
    /// into candle tensors on the CPU, converting floats to `compute`. A tensor already stored in its compute dtype is read with `pread` directly
    /// into the tensor's own storage, with no staging buffer, so a stage costs its weights
    /// once and not twice; a converted one stages only its own stored bytes.
    ///
    /// ```
    /// use memwise_model::Checkpoint;
    /// use memwise_model::checkpoint::StoredDType;
    ///
    /// let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama-safetensors");
    /// let checkpoint = Checkpoint::open(folder)?;
    /// let norm = ["model.norm.weight"];
    /// let tensors = checkpoint.load_candle_tensors(Some("model.norm"), &norm, Some(StoredDType::F32))?;
    /// assert_eq!(tensors["model.norm.weight"].dtype(), candle_core::DType::F32);
    /// # Ok::<(), memwise_model::Error>(())
    /// ```
    pub fn load_candle_tensors(
        &self,
        stage: Option<&str>,
        names: &[&str],
        compute: Option<StoredDType>,
    ) -> Result<HashMap<String, candle_core::Tensor>> {
        let mut files: HashMap<&std::path::Path, std::fs::File> = HashMap::new();
        let mut out = HashMap::with_capacity(names.len());
        for &name in names {
            let info = self
                .tensor_for(stage, name)
                .ok_or_else(|| Error::NotFound {
                    name: name.to_owned(),
                    folder: self.folder().to_owned(),
                })?;
            let file = match files.entry(info.file.as_path()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(
                    std::fs::File::open(&info.file)
                        .map_err(|err| Error::io("opening", &info.file, err))?,
                ),
            };
            out.insert(name.to_owned(), read_direct(file, info, compute)?);
        }
        Ok(out)
    }
}

/// Fills `len` bytes at `dest` with the tensor's bytes, with `pread` through a raw pointer so
/// that no reference to uninitialized memory is ever made.
fn read_into_uninit(
    file: &std::fs::File,
    info: &crate::checkpoint::TensorInfo,
    dest: *mut u8,
    len: usize,
) -> Result<()> {
    use std::os::fd::AsRawFd;

    let mut done = 0usize;
    while done < len {
        let offset = info.data.start + done as u64;
        // SAFETY: `dest` points to at least `len` writable bytes (the vector's capacity),
        // and `done < len` keeps the write in bounds.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                dest.add(done).cast(),
                len - done,
                offset as libc::off_t,
            )
        };
        match read {
            0 => {
                return Err(Error::Truncated {
                    file: info.file.clone(),
                    tensor: info.name.clone(),
                    needed: info.data.end,
                    actual: file.metadata().map_or(0, |m| m.len()),
                })
            }
            n if n > 0 => done += n as usize,
            _ => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::io("reading", &info.file, err));
                }
            }
        }
    }
    Ok(())
}

/// One tensor from `file` into candle storage; see `load_candle_tensors`.
fn read_direct(
    file: &std::fs::File,
    info: &crate::checkpoint::TensorInfo,
    compute: Option<StoredDType>,
) -> Result<candle_core::Tensor> {
    use std::os::unix::fs::FileExt;

    let target = match compute {
        Some(compute) if info.dtype.is_float() && compute.is_float() => compute,
        _ => info.dtype,
    };
    let len = usize::try_from(info.byte_len()).map_err(|_| Error::Conversion {
        tensor: info.name.clone(),
        from: info.dtype.to_string(),
        to: "a size this platform can address".into(),
    })?;
    let fill_at = |bytes: &mut [u8], offset: usize| {
        file.read_exact_at(bytes, info.data.start + offset as u64)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::Truncated {
                    file: info.file.clone(),
                    tensor: info.name.clone(),
                    needed: info.data.end,
                    actual: file.metadata().map_or(0, |m| m.len()),
                },
                _ => Error::io("reading", &info.file, e),
            })
    };
    let candle_error = |source| Error::Candle {
        tensor: info.name.clone(),
        source: Box::new(source),
    };
    let cpu = candle_core::Device::Cpu;
    // Read straight into the storage candle will own, when no conversion is needed. The
    // vector is not zeroed first: a reused block stays as it is until the read fills it.
    macro_rules! direct {
        ($t:ty) => {{
            let count = len / std::mem::size_of::<$t>();
            let mut values: Vec<$t> = Vec::with_capacity(count);
            read_into_uninit(file, info, values.as_mut_ptr().cast::<u8>(), len)?;
            // SAFETY: `read_into_uninit` filled all `len` bytes, and every bit pattern is a
            // valid value of these plain numeric types.
            unsafe { values.set_len(count) };
            candle_core::Tensor::from_vec(values, info.shape.as_slice(), &cpu).map_err(candle_error)
        }};
    }
    if target == info.dtype && cfg!(target_endian = "little") {
        match target {
            StoredDType::F32 => return direct!(f32),
            StoredDType::F16 => return direct!(half::f16),
            StoredDType::BF16 => return direct!(half::bf16),
            _ => {}
        }
    }
    if target == StoredDType::F32 && info.dtype.is_float() {
        // Widened a piece at a time through a small reused buffer into the storage candle
        // takes over: a stage stages 4 MiB, not its largest stored tensor.
        let mut values: Vec<f32> = Vec::with_capacity(len / info.dtype.size_in_bytes());
        STAGING.with(|staging| {
            let mut staging = staging.borrow_mut();
            staging.resize(STAGING_BYTES, 0);
            let mut offset = 0;
            while offset < len {
                let piece = (len - offset).min(STAGING_BYTES);
                fill_at(&mut staging[..piece], offset)?;
                super::dtype::extend_f32(&staging[..piece], info.dtype, &mut values);
                offset += piece;
            }
            Ok::<(), Error>(())
        })?;
        return candle_core::Tensor::from_vec(values, info.shape.as_slice(), &cpu)
            .map_err(candle_error);
    }
    let mut stored = vec![0u8; len];
    fill_at(&mut stored, 0)?;
    let view = TensorView::detached(info, &stored);
    view.to_candle_tensor(compute, &cpu)
}

/// Bytes of the buffer a converted tensor is read through, per thread: a multiple of every
/// element size.
pub(crate) const STAGING_BYTES: usize = 4 << 20;

thread_local! {
    static STAGING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_bytes_round_trip_and_refuse_a_dtype_checkpoints_cannot_store() {
        let device = candle_core::Device::Cpu;
        let t = candle_core::Tensor::new(&[1.5f32, -2.0], &device).unwrap();
        let (dtype, bytes) =
            tensor_bytes("w", &t.to_dtype(candle_core::DType::BF16).unwrap()).unwrap();
        assert_eq!(dtype, StoredDType::BF16);
        assert_eq!(bytes, [0xc0, 0x3f, 0x00, 0xc0]);
        let (dtype, bytes) = tensor_bytes("w", &t).unwrap();
        assert_eq!((dtype, bytes.len()), (StoredDType::F32, 8));

        let fp8 = t.to_dtype(candle_core::DType::F8E4M3).unwrap();
        let err = tensor_bytes("model.norm.weight", &fp8)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("tensor model.norm.weight: cannot convert candle F8E4M3"),
            "{err}"
        );
        assert_eq!(stored_dtype(candle_core::DType::F8E4M3), None);
        assert_eq!(
            stored_dtype(candle_core::DType::F16),
            Some(StoredDType::F16)
        );
    }

    #[test]
    fn every_dtype_memwise_and_candle_share_maps() {
        for (ours, theirs) in [
            (StoredDType::U8, candle_core::DType::U8),
            (StoredDType::I64, candle_core::DType::I64),
            (StoredDType::BF16, candle_core::DType::BF16),
            (StoredDType::F64, candle_core::DType::F64),
        ] {
            assert_eq!(candle_dtype(ours), Some(theirs));
            assert_eq!(ours.size_in_bytes(), theirs.size_in_bytes());
        }
        assert_eq!(candle_dtype(StoredDType::Bool), None);
        assert_eq!(candle_dtype(StoredDType::U64), None);
    }

    #[test]
    fn direct_loads_equal_the_layer_reader_for_every_dtype() {
        for fixture in ["tiny-llama-safetensors", "tiny-llama-sharded", "tiny-bert"] {
            let folder =
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/").to_owned() + fixture;
            let checkpoint = crate::Checkpoint::open(&folder).unwrap();
            let names: Vec<&str> = checkpoint
                .index()
                .tensors()
                .iter()
                .map(|t| t.name.as_str())
                .collect();
            for compute in [None, Some(StoredDType::F32), Some(StoredDType::F16)] {
                let direct = checkpoint
                    .load_candle_tensors(None, &names, compute)
                    .unwrap();
                let mut reader = checkpoint.reader(crate::ReadStrategy::Pread);
                let staged = reader
                    .read_tensors(None, &names)
                    .unwrap()
                    .to_candle_tensors(compute, &candle_core::Device::Cpu)
                    .unwrap();
                for name in &names {
                    let (a, b) = (&direct[*name], &staged[*name]);
                    assert_eq!(
                        (a.dtype(), a.dims()),
                        (b.dtype(), b.dims()),
                        "{fixture} {name}"
                    );
                    let bytes = |t: &candle_core::Tensor| {
                        t.flatten_all()
                            .unwrap()
                            .to_dtype(candle_core::DType::F64)
                            .unwrap()
                            .to_vec1::<f64>()
                            .unwrap()
                    };
                    assert_eq!(bytes(a), bytes(b), "{fixture} {name} {compute:?}");
                }
            }
        }
    }

    #[test]
    fn a_direct_load_from_a_truncated_file_names_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let source = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-llama-safetensors"
        );
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        let checkpoint = crate::Checkpoint::open(dir.path()).unwrap();
        let last = checkpoint
            .index()
            .tensors()
            .iter()
            .max_by_key(|t| t.data.end)
            .unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&last.file)
            .unwrap();
        file.set_len(last.data.end - 1).unwrap();
        let err = checkpoint
            .load_candle_tensors(None, &[last.name.as_str()], Some(StoredDType::F32))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&last.name) && err.contains("model.safetensors"),
            "{err}"
        );
    }
}
