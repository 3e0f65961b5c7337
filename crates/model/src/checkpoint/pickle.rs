//! A pickle reader that understands only what `torch.save` writes for a state dict, and
//! executes nothing.
//!
//! Python's unpickler calls any global the stream names, which is why loading an untrusted
//! `.bin` runs arbitrary code. This one keeps a fixed list of globals (the tensor rebuild
//! functions, storage types, `OrderedDict`) as inert markers, refuses every other global
//! and every opcode torch does not emit, and turns `_rebuild_tensor_v2` calls into plain
//! tensor descriptions. Containers live in an arena and are referred to by index, so
//! memoized values share instead of being copied (no blow-up from repeated `BINGET`) and
//! nothing can form a reference-counted cycle.

use std::collections::HashMap;
use std::rc::Rc;

use crate::checkpoint::dtype::StoredDType;

/// Caps that keep a hostile pickle from using unbounded memory.
const MAX_STACK: usize = 1 << 20;
const MAX_OBJECTS: usize = 1 << 22;
const MAX_MEMO: usize = 1 << 22;

/// A storage the pickle refers to: one zip entry, `data/<key>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub key: String,
    pub dtype: StoredDType,
    pub element_count: u64,
}

/// A tensor as `_rebuild_tensor_v2(storage, offset, size, stride, ...)` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    pub storage_offset: u64,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// Why a pickle was refused, and the byte offset of the opcode that was refused.
#[derive(Debug)]
pub(crate) struct PickleError {
    pub offset: usize,
    pub reason: String,
}

type PResult<T> = Result<T, PickleError>;

#[derive(Debug, Clone)]
enum Value {
    /// None, booleans and floats: torch writes them (requires_grad, metadata) but no
    /// tensor location depends on their values.
    Scalar,
    Int(i64),
    Str(Rc<str>),
    Object(usize),
}

#[derive(Debug)]
enum Object {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
}

/// The only callables and classes a torch state dict needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(StoredDType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        let storage = |dtype| Some(Global::Storage(dtype));
        match (module, name) {
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
            ("torch", "FloatStorage") => storage(StoredDType::F32),
            ("torch", "HalfStorage") => storage(StoredDType::F16),
            ("torch", "BFloat16Storage") => storage(StoredDType::BF16),
            ("torch", "DoubleStorage") => storage(StoredDType::F64),
            ("torch", "LongStorage") => storage(StoredDType::I64),
            ("torch", "IntStorage") => storage(StoredDType::I32),
            ("torch", "ShortStorage") => storage(StoredDType::I16),
            ("torch", "CharStorage") => storage(StoredDType::I8),
            ("torch", "ByteStorage") => storage(StoredDType::U8),
            ("torch", "BoolStorage") => storage(StoredDType::Bool),
            _ => None,
        }
    }
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    /// Where the opcode being run started, for error messages.
    op_start: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    objects: Vec<Object>,
}

/// Runs a state-dict pickle and returns `(name, tensor)` pairs in the order they were saved.
pub(crate) fn read_state_dict(input: &[u8]) -> PResult<Vec<(String, TensorRef)>> {
    let mut machine = Machine {
        input,
        pos: 0,
        op_start: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: Vec::new(),
    };
    let root = machine.run()?;
    machine.state_dict(root)
}

impl Machine<'_> {
    fn fail<T>(&self, reason: impl Into<String>) -> PResult<T> {
        Err(PickleError {
            offset: self.op_start,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: usize) -> PResult<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.input.len());
        match end {
            Some(end) => {
                let bytes = self.input.get(self.pos..end).unwrap_or_default();
                self.pos = end;
                Ok(bytes)
            }
            None => self.fail(format!("opcode needs {n} more bytes than the pickle holds")),
        }
    }

    fn take_array<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let bytes = self.take(N)?;
        let mut array = [0u8; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    fn take_line(&mut self) -> PResult<String> {
        let rest = self.input.get(self.pos..).unwrap_or_default();
        let Some(len) = rest.iter().position(|&b| b == b'\n') else {
            return self.fail("unterminated GLOBAL name");
        };
        let line = self.take(len + 1)?;
        match std::str::from_utf8(line.get(..len).unwrap_or_default()) {
            Ok(text) => Ok(text.to_owned()),
            Err(_) => self.fail("GLOBAL name is not UTF-8"),
        }
    }

    fn take_str(&mut self, len: u64) -> PResult<Value> {
        let Ok(len) = usize::try_from(len) else {
            return self.fail("string length overflows");
        };
        let bytes = self.take(len)?;
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok(Value::Str(Rc::from(text))),
            Err(_) => self.fail("string is not UTF-8"),
        }
    }

    fn push(&mut self, value: Value) -> PResult<()> {
        if self.stack.len() >= MAX_STACK {
            return self.fail("pickle stack grows past its limit");
        }
        self.stack.push(value);
        Ok(())
    }

    fn pop(&mut self) -> PResult<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("pop from an empty stack");
        }
        match self.stack.pop() {
            Some(value) => Ok(value),
            None => self.fail("pop from an empty stack"),
        }
    }

    fn top(&self) -> PResult<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match self.stack.last() {
            Some(value) if self.stack.len() > floor => Ok(value),
            _ => self.fail("opcode needs a value on the stack"),
        }
    }

    /// Pops everything above the last MARK, and the mark.
    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return self.fail("opcode needs a MARK");
        };
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn alloc(&mut self, object: Object) -> PResult<Value> {
        if self.objects.len() >= MAX_OBJECTS {
            return self.fail("pickle creates more objects than the limit");
        }
        self.objects.push(object);
        Ok(Value::Object(self.objects.len() - 1))
    }

    fn object(&self, value: &Value) -> Option<&Object> {
        match value {
            Value::Object(index) => self.objects.get(*index),
            _ => None,
        }
    }

    fn memo_put(&mut self, key: u64) -> PResult<()> {
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return self.fail("pickle memo grows past its limit");
        }
        let value = self.top()?.clone();
        self.memo.insert(key, value);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> PResult<()> {
        match self.memo.get(&key) {
            Some(value) => {
                let value = value.clone();
                self.push(value)
            }
            None => self.fail(format!("memo key {key} was never stored")),
        }
    }

    fn run(&mut self) -> PResult<Value> {
        loop {
            self.op_start = self.pos;
            let [op] = self.take_array::<1>()?;
            match op {
                0x80 => {
                    // PROTO: torch writes protocol 2; accept up to 5, whose opcodes we know.
                    let [version] = self.take_array::<1>()?;
                    if version > 5 {
                        return self.fail(format!("pickle protocol {version} is unknown"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint for buffered readers; the whole input is here.
                    self.take_array::<8>()?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'N' | 0x88 | 0x89 => self.push(Value::Scalar)?,
                b'J' => {
                    let v = i32::from_le_bytes(self.take_array()?);
                    self.push(Value::Int(v.into()))?
                }
                b'K' => {
                    let [v] = self.take_array::<1>()?;
                    self.push(Value::Int(v.into()))?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take_array()?);
                    self.push(Value::Int(v.into()))?
                }
                0x8a => {
                    // LONG1: a little-endian two's-complement integer of n bytes.
                    let [n] = self.take_array::<1>()?;
                    if n > 8 {
                        return self.fail(format!("{n}-byte integer does not fit in 64 bits"));
                    }
                    let bytes = self.take(n.into())?;
                    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
                    let mut buf = [if negative { 0xff } else { 0 }; 8];
                    for (slot, byte) in buf.iter_mut().zip(bytes) {
                        *slot = *byte;
                    }
                    self.push(Value::Int(i64::from_le_bytes(buf)))?
                }
                b'G' => {
                    self.take_array::<8>()?;
                    self.push(Value::Scalar)?
                }
                b'X' => {
                    let len = u32::from_le_bytes(self.take_array()?);
                    let s = self.take_str(len.into())?;
                    self.push(s)?
                }
                0x8c => {
                    let [len] = self.take_array::<1>()?;
                    let s = self.take_str(len.into())?;
                    self.push(s)?
                }
                0x8d => {
                    let len = u64::from_le_bytes(self.take_array()?);
                    let s = self.take_str(len)?;
                    self.push(s)?
                }
                b'}' => {
                    let v = self.alloc(Object::Dict(Vec::new()))?;
                    self.push(v)?
                }
                b']' => {
                    let v = self.alloc(Object::List(Vec::new()))?;
                    self.push(v)?
                }
                b')' => {
                    let v = self.alloc(Object::Tuple(Vec::new()))?;
                    self.push(v)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Object::Tuple(items))?;
                    self.push(v)?
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.alloc(Object::Tuple(items))?;
                    self.push(v)?
                }
                b'q' => {
                    let [key] = self.take_array::<1>()?;
                    self.memo_put(key.into())?
                }
                b'r' => {
                    let key = u32::from_le_bytes(self.take_array()?);
                    self.memo_put(key.into())?
                }
                0x94 => {
                    // MEMOIZE: the next free index.
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?
                }
                b'h' => {
                    let [key] = self.take_array::<1>()?;
                    self.memo_get(key.into())?
                }
                b'j' => {
                    let key = u32::from_le_bytes(self.take_array()?);
                    self.memo_get(key.into())?
                }
                b'c' => {
                    let module = self.take_line()?;
                    let name = self.take_line()?;
                    self.push_global(&module, &name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.push_global(&module, &name)?
                        }
                        _ => return self.fail("STACK_GLOBAL needs two strings"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_storage(&pid)?;
                    let v = self.alloc(Object::Storage(storage))?;
                    self.push(v)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let result = self.reduce(&callable, &args)?;
                    self.push(result)?
                }
                b'b' => {
                    // BUILD sets an object's state: torch uses it for the state dict's
                    // `_metadata` and for tensor attributes. Neither matters for the weights.
                    let _state = self.pop()?;
                    let target = self.top()?;
                    if !matches!(
                        self.object(target),
                        Some(Object::Dict(_) | Object::Tensor(_))
                    ) {
                        return self.fail("BUILD on something other than a dict or tensor");
                    }
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_dict(vec![key, value])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.fail("SETITEMS with an odd number of values");
                    }
                    self.extend_dict(items)?
                }
                b'a' => {
                    let value = self.pop()?;
                    self.extend_list(vec![value])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?
                }
                other => {
                    return self.fail(format!(
                        "opcode 0x{other:02x} is not one torch.save writes for a state dict"
                    ))
                }
            }
        }
    }

    fn push_global(&mut self, module: &str, name: &str) -> PResult<()> {
        match Global::resolve(module, name) {
            Some(global) => {
                let v = self.alloc(Object::Global(global))?;
                self.push(v)
            }
            None => self.fail(format!(
                "refusing global {module}.{name}: memwise reads tensors and never runs pickled code"
            )),
        }
    }

    fn extend_dict(&mut self, items: Vec<Value>) -> PResult<()> {
        let Value::Object(index) = *self.top()? else {
            return self.fail("SETITEM on something other than a dict");
        };
        let Some(Object::Dict(entries)) = self.objects.get_mut(index) else {
            return self.fail("SETITEM on something other than a dict");
        };
        let mut items = items.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            entries.push((key, value));
        }
        Ok(())
    }

    fn extend_list(&mut self, items: Vec<Value>) -> PResult<()> {
        let Value::Object(index) = *self.top()? else {
            return self.fail("APPEND on something other than a list");
        };
        let Some(Object::List(entries)) = self.objects.get_mut(index) else {
            return self.fail("APPEND on something other than a list");
        };
        entries.extend(items);
        Ok(())
    }

    fn tuple(&self, value: &Value) -> Option<&[Value]> {
        match self.object(value) {
            Some(Object::Tuple(items)) => Some(items),
            _ => None,
        }
    }

    /// torch's persistent id: `('storage', StorageType, key, location, element_count)`.
    fn persistent_storage(&self, pid: &Value) -> PResult<StorageRef> {
        let Some([kind, storage_type, key, _location, count]) = self.tuple(pid) else {
            return self
                .fail("persistent id is not a 5-tuple ('storage', type, key, location, numel)");
        };
        let (Value::Str(kind), Value::Str(key), Value::Int(count)) = (kind, key, count) else {
            return self.fail("persistent id has the wrong field types");
        };
        if &**kind != "storage" {
            return self.fail(format!("persistent id of kind {kind:?}"));
        }
        let Some(Object::Global(Global::Storage(dtype))) = self.object(storage_type) else {
            return self.fail("persistent id does not name a storage type");
        };
        let Ok(element_count) = u64::try_from(*count) else {
            return self.fail(format!("storage {key} has a negative size"));
        };
        // The key becomes part of a zip entry name; keep it to what torch writes.
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return self.fail(format!("storage key {key:?} is not a plain name"));
        }
        Ok(StorageRef {
            key: key.to_string(),
            dtype: *dtype,
            element_count,
        })
    }

    fn reduce(&mut self, callable: &Value, args: &Value) -> PResult<Value> {
        let Some(Object::Global(global)) = self.object(callable) else {
            return self.fail("REDUCE of something that is not an allowed global");
        };
        let Some(args) = self.tuple(args) else {
            return self.fail("REDUCE arguments are not a tuple");
        };
        match *global {
            Global::OrderedDict if args.is_empty() => self.alloc(Object::Dict(Vec::new())),
            Global::RebuildTensorV2 => {
                let tensor = self.rebuild_tensor(args)?;
                self.alloc(Object::Tensor(tensor))
            }
            // `_rebuild_parameter(data, requires_grad, backward_hooks)`: the data is the tensor.
            Global::RebuildParameter => match args.first() {
                Some(data) if matches!(self.object(data), Some(Object::Tensor(_))) => {
                    Ok(data.clone())
                }
                _ => self.fail("_rebuild_parameter without a tensor"),
            },
            _ => self.fail("REDUCE of a global with arguments it never takes"),
        }
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, metadata])`.
    fn rebuild_tensor(&self, args: &[Value]) -> PResult<TensorRef> {
        let [storage, offset, size, stride, ..] = args else {
            return self.fail("_rebuild_tensor_v2 takes at least 4 arguments");
        };
        let Some(Object::Storage(storage)) = self.object(storage) else {
            return self.fail("_rebuild_tensor_v2's first argument is not a storage");
        };
        let Value::Int(offset) = offset else {
            return self.fail("_rebuild_tensor_v2's storage offset is not an integer");
        };
        let Ok(storage_offset) = u64::try_from(*offset) else {
            return self.fail("negative storage offset");
        };
        let shape = self.dims(size, "size")?;
        let stride = self.dims(stride, "stride")?;
        if shape.len() != stride.len() {
            return self.fail("size and stride have different lengths");
        }
        Ok(TensorRef {
            storage: storage.clone(),
            storage_offset,
            shape,
            stride,
        })
    }

    fn dims(&self, value: &Value, what: &str) -> PResult<Vec<usize>> {
        let Some(items) = self.tuple(value) else {
            return self.fail(format!("tensor {what} is not a tuple"));
        };
        items
            .iter()
            .map(|item| match item {
                Value::Int(v) => usize::try_from(*v).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .map_or_else(
                || {
                    self.fail(format!(
                        "tensor {what} holds a non-integer or negative value"
                    ))
                },
                Ok,
            )
    }

    fn state_dict(&self, root: Value) -> PResult<Vec<(String, TensorRef)>> {
        let Some(Object::Dict(entries)) = self.object(&root) else {
            return self.fail("the pickle's result is not a state dict");
        };
        entries
            .iter()
            .map(|(key, value)| {
                let Value::Str(name) = key else {
                    return self.fail("state dict key is not a string");
                };
                match self.object(value) {
                    Some(Object::Tensor(tensor)) => Ok((name.to_string(), tensor.clone())),
                    _ => self.fail(format!("state dict entry {name} is not a tensor")),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle of `{"w": _rebuild_tensor_v2(storage('0', FloatStorage, 6), 0,
    /// (2, 3), (3, 1), False, OrderedDict())}`, opcode by opcode as torch writes it.
    pub(crate) fn tiny_state_dict() -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend_from_slice(b"ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00w");
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02(");
        p.extend_from_slice(b"(X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04");
        p.extend_from_slice(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tq\x05Q");
        p.extend_from_slice(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89ccollections\nOrderedDict\n)R");
        p.extend_from_slice(b"tRq\x06u}b.");
        p
    }

    #[test]
    fn reads_a_state_dict() {
        let tensors = read_state_dict(&tiny_state_dict()).unwrap();
        assert_eq!(tensors.len(), 1);
        let (name, tensor) = &tensors[0];
        assert_eq!(name, "w");
        assert_eq!(tensor.shape, [2, 3]);
        assert_eq!(tensor.stride, [3, 1]);
        assert_eq!(tensor.storage.key, "0");
        assert_eq!(tensor.storage.dtype, StoredDType::F32);
        assert_eq!(tensor.storage.element_count, 6);
    }

    #[test]
    fn refuses_code_execution() {
        let evil = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let err = read_state_dict(evil).unwrap_err();
        assert!(err.reason.contains("os.system"), "{}", err.reason);
        assert_eq!(err.offset, 2);
    }

    #[test]
    fn every_prefix_fails_cleanly() {
        let full = tiny_state_dict();
        for len in 0..full.len() {
            assert!(read_state_dict(&full[..len]).is_err(), "prefix {len}");
        }
    }

    #[test]
    fn refuses_unknown_opcodes_and_bad_memo() {
        assert!(read_state_dict(b"\x80\x02\x81.").is_err());
        assert!(read_state_dict(b"\x80\x02h\x05.").is_err());
        assert!(read_state_dict(b"\x80\x02}X\x01\x00\x00\x00aK\x01s.").is_err());
    }
}
