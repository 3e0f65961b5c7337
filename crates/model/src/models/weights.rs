//! Where a block's weights come from, and the two layers that can compute on a tensor
//! still in its file.
//!
//! A block is built from [`Weights`]: a [`VarBuilder`] of the tensors read into memory and,
//! when the runner maps the checkpoint, the stage's matrices as [`MappedTensor`]s (stored as
//! f32, or as bf16 or f16 when the stage streams). [`Linear`] multiplies by a mapped matrix
//! with the same `gemm` call candle makes for a weight in memory, in place or on each chunk
//! of rows widened exactly into one reused f32 buffer (so the logits are bitwise those of a
//! copy), and [`Embedding`] copies out only the rows the input uses. Anything else asked of a mapped tensor gets a
//! copy of it (norm weights, biases, a fused weight split by rows).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::MappedTensor;

/// A stage's weights: tensors in memory behind a [`VarBuilder`], and optionally tensors
/// computed on in their mapped files.
#[derive(Clone)]
pub struct Weights<'a> {
    vb: VarBuilder<'a>,
    mapped: Option<Arc<HashMap<String, Arc<MappedTensor>>>>,
}

impl<'a> From<VarBuilder<'a>> for Weights<'a> {
    fn from(vb: VarBuilder<'a>) -> Self {
        Self { vb, mapped: None }
    }
}

impl<'a> Weights<'a> {
    /// `vb`'s tensors, and `mapped` (by full Hugging Face name) computed on in place.
    pub(crate) fn with_mapped(
        vb: VarBuilder<'a>,
        mapped: HashMap<String, Arc<MappedTensor>>,
    ) -> Self {
        Self {
            vb,
            mapped: (!mapped.is_empty()).then(|| Arc::new(mapped)),
        }
    }

    /// The builder of in-memory tensors, at this prefix.
    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }

    /// The same weights under `prefix` (`weights.pp("mlp")`), as [`VarBuilder::pp`].
    pub fn pp(&self, prefix: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(prefix),
            mapped: self.mapped.clone(),
        }
    }

    /// The dtype blocks compute in.
    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    /// The device blocks compute on.
    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    fn mapped(&self, name: &str, shape: &Shape) -> candle_core::Result<Option<Arc<MappedTensor>>> {
        let Some(mapped) = &self.mapped else {
            return Ok(None);
        };
        let prefix = self.vb.prefix();
        let full = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}.{name}")
        };
        let Some(tensor) = mapped.get(&full) else {
            return Ok(None);
        };
        if tensor.shape() != shape.dims() {
            return Err(candle_core::Error::Msg(format!(
                "shape mismatch for {full}, expected {:?}, got {:?}",
                shape.dims(),
                tensor.shape()
            )));
        }
        Ok(Some(Arc::clone(tensor)))
    }

    /// The tensor `name` with `shape`, in memory (a mapped one is copied out).
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        match self.mapped(name, &shape)? {
            Some(mapped) => {
                let copy = match mapped.as_f32() {
                    Some(values) => Tensor::from_slice(values, shape, self.device())?,
                    None => Tensor::from_vec(mapped.to_f32_vec(), shape, self.device())?,
                };
                mapped.release(mapped.all_rows());
                Ok(copy)
            }
            None => self.vb.get(shape, name),
        }
    }

    /// The `(rows, cols)` matrix `name`, in place where it is mapped.
    pub fn matrix(&self, (rows, cols): (usize, usize), name: &str) -> candle_core::Result<Matrix> {
        match self.mapped(name, &(rows, cols).into())? {
            Some(mapped) => Ok(Matrix::Mapped(mapped)),
            None => Ok(Matrix::InMemory(self.vb.get((rows, cols), name)?)),
        }
    }

    /// The linear layer `weight` `(out_dim, in_dim)` and, with `bias`, `bias` `(out_dim)`
    /// under this prefix, as Hugging Face names them.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> candle_core::Result<Linear> {
        let weight = self.matrix((out_dim, in_dim), "weight")?;
        let bias = bias.then(|| self.get(out_dim, "bias")).transpose()?;
        Ok(Linear::new(weight, bias))
    }

    /// The embedding table `weight` `(rows, width)` under this prefix.
    pub fn embedding(&self, rows: usize, width: usize) -> candle_core::Result<Embedding> {
        Ok(Embedding::new(self.matrix((rows, width), "weight")?))
    }
}

/// A weight matrix `(rows, cols)`: in memory, or read in place from its mapped file.
#[derive(Debug, Clone)]
pub enum Matrix {
    /// A tensor in memory.
    InMemory(Tensor),
    /// A matrix in a mapped file, computed on as f32.
    Mapped(Arc<MappedTensor>),
}

/// Bytes of a mapped matrix multiplied at a time: the transient pages one matmul holds are
/// at most this much (whole rows; one row if a row is larger), released as each chunk is
/// done, so even a 250 MiB vocabulary head streams through a small budget.
pub(crate) const CHUNK_BYTES: usize = 16 << 20;

/// Rows of a matrix whose rows hold `row_len` f32 values that make one chunk; `widened`
/// (stored in half precision) half as many, so that its pages and the f32 buffer they are
/// widened into hold no more than a chunk of f32 in memory would (0.75 of it).
pub(crate) fn rows_per_chunk(row_len: usize, widened: bool) -> usize {
    let rows = (CHUNK_BYTES / (row_len * 4).max(1)).max(1);
    if widened {
        (rows / 2).max(1)
    } else {
        rows
    }
}

/// `x · Wᵀ (+ b)`, as [`candle_nn::Linear`] computes it, for a weight in memory or mapped.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer of `weight` `(out_dim, in_dim)` and an optional bias `(out_dim)`.
    pub fn new(weight: Matrix, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let out = match &self.weight {
            Matrix::InMemory(weight) => {
                return candle_nn::Linear::new(weight.clone(), self.bias.clone()).forward(xs)
            }
            Matrix::Mapped(weight) => mapped_matmul(xs, weight)?,
        };
        match &self.bias {
            Some(bias) => out.broadcast_add(bias),
            None => Ok(out),
        }
    }
}

/// `xs · Wᵀ` for a mapped `W` `(n, k)`: `xs` flattened to `(m, k)` and multiplied by
/// `gemm` with exactly the arguments candle's CPU matmul passes for `xs.matmul(&w.t())`
/// (so the result is the same to the bit), `W` a slice of the mapping (or, stored in half
/// precision, that slice widened into [`WIDENED`]); in chunks of rows, each released after
/// use when the tensor is transient.
fn mapped_matmul(xs: &Tensor, weight: &MappedTensor) -> candle_core::Result<Tensor> {
    let (n, k) = match weight.shape() {
        &[n, k] => (n, k),
        other => candle_core::bail!(
            "{}: a linear weight must be 2-D, got {other:?}",
            weight.name()
        ),
    };
    if xs.dtype() != DType::F32 || !xs.device().is_cpu() {
        candle_core::bail!(
            "{}: a mapped weight multiplies f32 inputs on the CPU, got {:?} on {:?}",
            weight.name(),
            xs.dtype(),
            xs.device()
        );
    }
    let mut out_dims = xs.dims().to_vec();
    match out_dims.last_mut() {
        Some(last) if *last == k => *last = n,
        _ => candle_core::bail!(
            "{}: input {:?} does not end in the weight's {k} columns",
            weight.name(),
            xs.dims()
        ),
    }
    let xs = xs.contiguous()?;
    let m = xs.elem_count() / k;
    let mut dst = vec![0f32; m * n];
    {
        let (storage, layout) = xs.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("{}: the input is not on the CPU", weight.name());
        };
        let lhs = &cpu.as_slice::<f32>()?[layout.start_offset()..][..m * k];
        let chunk = rows_per_chunk(k, weight.as_f32().is_none());
        WIDENED.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut start = 0;
            while start < n {
                let rows = start..(start + chunk).min(n);
                let rhs = weight.rows(rows.clone(), &mut scratch);
                gemm_rows(lhs, m, k, rhs, &rows, n, &mut dst);
                weight.release(rows.clone());
                start = rows.end;
            }
        });
    }
    Tensor::from_vec(dst, out_dims, &Device::Cpu)
}

thread_local! {
    /// The chunk of a half-precision mapped matrix widened to f32 for its product: one
    /// chunk's bytes per computing thread, reused by every product so that streaming a
    /// stage again faults in no fresh pages.
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dst[:, rows] = lhs · rhsᵀ` for `lhs` `(m, k)` row-major, `rhs` the `(rows.len(), k)`
/// row-major slice of the weight and `dst` `(m, n)` row-major.
fn gemm_rows(
    lhs: &[f32],
    m: usize,
    k: usize,
    rhs: &[f32],
    rows: &Range<usize>,
    n: usize,
    dst: &mut [f32],
) {
    // candle asks the system for the CPU count on every call; once is enough.
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *THREADS.get_or_init(candle_core::utils::get_num_threads);
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    debug_assert_eq!(rhs.len(), rows.len() * k);
    debug_assert!(lhs.len() >= m * k && dst.len() >= m * n);
    // SAFETY: `lhs` holds m×k elements at strides (k, 1), `rhs` rows.len()×k at (k, 1), read
    // transposed as a (k, rows.len()) matrix at strides (1, k); `dst` holds m×n elements and
    // the gemm writes the m×rows.len() block starting at column `rows.start`, row stride n,
    // all inside it. The three do not overlap (dst is a fresh Vec).
    unsafe {
        gemm::gemm(
            m,
            rows.len(),
            k,
            dst.as_mut_ptr().add(rows.start),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// An embedding table: in memory, or mapped, where a lookup reads only the rows the ids
/// name with `pread` (a 250 MiB table costs a prompt of 128 tokens 1 MiB, and holds no
/// page in the process).
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Matrix,
}

impl Embedding {
    /// A lookup into `table` `(rows, width)`.
    pub fn new(table: Matrix) -> Self {
        Self { table }
    }

    /// The table as the weight of a linear layer (a tied `lm_head`).
    pub fn as_linear(&self) -> Linear {
        Linear::new(self.table.clone(), None)
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match &self.table {
            Matrix::InMemory(table) => {
                let width = table.dim(1)?;
                candle_nn::Embedding::new(table.clone(), width).forward(ids)
            }
            Matrix::Mapped(table) => {
                let width = table.row_len();
                let rows = table.shape()[0];
                let ids_flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut out = Vec::with_capacity(ids_flat.len() * width);
                for &id in &ids_flat {
                    let id = id as usize;
                    if id >= rows {
                        candle_core::bail!(
                            "{}: id {id} is outside the table's {rows} rows",
                            table.name()
                        );
                    }
                    let row = table.read_rows(id..id + 1).map_err(|e| {
                        candle_core::Error::Msg(format!("reading {} row {id}: {e}", table.name()))
                    })?;
                    out.extend_from_slice(&row);
                }
                let mut dims = ids.dims().to_vec();
                dims.push(width);
                Tensor::from_vec(out, dims, &Device::Cpu)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::checkpoint::{MappedFiles, StoredDType, TensorInfo};

    /// `rows × cols` f32 values written after an 8-byte header (as a safetensors file
    /// starts), and the mapping of them.
    fn mapped_matrix(
        dir: &std::path::Path,
        rows: usize,
        cols: usize,
        transient: bool,
    ) -> (Tensor, MappedTensor, MappedFiles) {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 317.0)
            .collect();
        let path = dir.join(format!("m{rows}x{cols}{transient}.bin"));
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&[0u8; 8]).unwrap();
        for v in &values {
            file.write_all(&v.to_le_bytes()).unwrap();
        }
        drop(file);
        let end = 8 + (rows * cols * 4) as u64;
        let info = TensorInfo::new("w", &path, StoredDType::F32, vec![rows, cols], 8..end);
        let files = MappedFiles::default();
        // SAFETY: the test's own file, not written again.
        let mapped = unsafe { files.tensor(&info, StoredDType::F32, transient, false) }
            .unwrap()
            .expect("an aligned f32 tensor maps");
        let tensor = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        (tensor, mapped, files)
    }

    fn input(m: usize, k: usize) -> Tensor {
        let values: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 53.0)
            .collect();
        Tensor::from_vec(values, (1, m, k), &Device::Cpu).unwrap()
    }

    #[test]
    fn a_mapped_linear_equals_candles_to_the_bit_in_row_chunks_and_one_token_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        // More rows than one chunk, and a last chunk that is not full.
        let k = 64;
        let n = rows_per_chunk(k, false) * 2 + 37;
        let (tensor, mapped, _files) = mapped_matrix(dir.path(), n, k, true);
        let bias =
            Tensor::from_vec((0..n).map(|i| i as f32 / 100.0).collect(), n, &Device::Cpu).unwrap();
        let in_memory = candle_nn::Linear::new(tensor, Some(bias.clone()));
        let on_map = Linear::new(Matrix::Mapped(Arc::new(mapped)), Some(bias));
        let values = |layer: &dyn Module, xs: &Tensor| -> Vec<f32> {
            let out = layer.forward(xs).unwrap();
            out.flatten_all().unwrap().to_vec1().unwrap()
        };
        for m in [1, 7, 128] {
            let xs = input(m, k);
            let expected = values(&in_memory, &xs);
            let got = values(&on_map, &xs);
            assert_eq!(expected.len(), got.len());
            for (i, (a, b)) in expected.iter().zip(&got).enumerate() {
                if m == 1 {
                    // One token: gemm's matrix-vector kernel sums a partial last chunk of
                    // rows in another order than the same rows inside a wider product, so
                    // those rows differ in the last bit or two. Every placement chunks the
                    // same way, so streamed and full loads still agree to the bit.
                    assert!(
                        (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                        "row {i}: {a} vs {b}"
                    );
                } else {
                    assert_eq!(a.to_bits(), b.to_bits(), "m = {m}, row {i}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn a_mapped_embedding_copies_the_rows_the_ids_name() {
        let dir = tempfile::tempdir().unwrap();
        let (tensor, mapped, _files) = mapped_matrix(dir.path(), 300, 16, true);
        let ids = Tensor::new(&[[3u32, 299, 0], [7, 7, 150]], &Device::Cpu).unwrap();
        let expected = candle_nn::Embedding::new(tensor, 16).forward(&ids).unwrap();
        let got = Embedding::new(Matrix::Mapped(Arc::new(mapped)))
            .forward(&ids)
            .unwrap();
        assert_eq!(got.dims(), expected.dims());
        let diff = (got - expected).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let out_of_range = Tensor::new(&[[300u32]], &Device::Cpu).unwrap();
        let (_, mapped, _files) = mapped_matrix(dir.path(), 300, 16, false);
        let error = Embedding::new(Matrix::Mapped(Arc::new(mapped)))
            .forward(&out_of_range)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("id 300") && error.contains("300 rows"),
            "{error}"
        );
    }

    /// Resident bytes of this process's mapping of `path` (`/proc/self/smaps`).
    fn mapped_rss(path: &std::path::Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            if line.contains('-') && line.split_whitespace().count() >= 5 {
                inside = line.ends_with(path.to_str().unwrap());
            } else if inside {
                if let Some(kib) = line.strip_prefix("Rss:") {
                    total += kib
                        .trim()
                        .trim_end_matches(" kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap()
                        << 10;
                }
            }
        }
        total
    }

    #[test]
    fn a_transient_matrix_leaves_no_pages_in_the_process_and_a_resident_one_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        // Two chunks of rows.
        let k = 1024;
        let n = rows_per_chunk(k, false) * 2;
        let xs = input(4, k);
        let (_, transient, _files) = mapped_matrix(dir.path(), n, k, true);
        let path = dir.path().join(format!("m{n}x{k}true.bin"));
        Linear::new(Matrix::Mapped(Arc::new(transient)), None)
            .forward(&xs)
            .unwrap();
        let left = mapped_rss(&path);
        // Only the pages at the chunks' edges (shared with a neighbour) may stay.
        assert!(
            left <= 4 * 4096,
            "{left} bytes of a transient matrix stayed resident"
        );

        let (_, resident, _files) = mapped_matrix(dir.path(), n, k, false);
        let path = dir.path().join(format!("m{n}x{k}false.bin"));
        let layer = Linear::new(Matrix::Mapped(Arc::new(resident)), None);
        layer.forward(&xs).unwrap();
        let kept = mapped_rss(&path);
        assert!(
            kept >= (n * k * 4) as u64,
            "a resident matrix kept only {kept} bytes"
        );
    }
}
