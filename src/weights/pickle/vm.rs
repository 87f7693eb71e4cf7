//! The restricted unpickler: a pickle virtual machine (protocols 2 to 5, the opcodes
//! `torch.save` and `pickle.dump` write) that builds plain values, containers, storages and
//! tensor descriptions, and resolves no global but an allow-list ([`Global`]). Nothing is ever
//! imported or called: the allowed globals are interpreted by this file, every other one is
//! refused with [`crate::Error::UnsafePickle`] the moment the opcode naming it is read.
//! Counterpart: CPython's `Lib/pickle.py` (`_Unpickler`) and `Lib/pickletools.py` (opcode list).

use std::collections::HashMap;
use std::rc::Rc;

use candle_core::DType;

/// A global the unpickler accepts, interpreted here instead of being imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Global {
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter(data, requires_grad, hooks)` (and `_with_state`): the data.
    RebuildParameter,
    /// `collections.OrderedDict`: a dict.
    OrderedDict,
    /// `torch.<T>Storage`, the element type of a storage; `None` for types we cannot hold (i8, complex).
    Storage(&'static str, Option<DType>),
    /// `torch.float32` and other dtypes, as values.
    Dtype(&'static str),
}

/// The storage types `torch.save` names, with their candle dtype (bool as u8: one byte, 0 or 1).
const STORAGES: &[(&str, Option<DType>)] = &[
    ("FloatStorage", Some(DType::F32)),
    ("DoubleStorage", Some(DType::F64)),
    ("HalfStorage", Some(DType::F16)),
    ("BFloat16Storage", Some(DType::BF16)),
    ("LongStorage", Some(DType::I64)),
    ("IntStorage", Some(DType::I32)),
    ("ShortStorage", Some(DType::I16)),
    ("ByteStorage", Some(DType::U8)),
    ("BoolStorage", Some(DType::U8)),
    ("CharStorage", None),
    ("ComplexFloatStorage", None),
    ("ComplexDoubleStorage", None),
];

/// The dtype names `torch` exposes that a pickle may name as values.
const DTYPES: &[&str] = &[
    "float16", "half", "bfloat16", "float32", "float", "float64", "double", "int64", "long", "int32", "int", "int16",
    "short", "int8", "uint8", "bool",
];

impl Global {
    /// The allowed global `module.name`, or `None` (refused).
    fn resolve(module: &str, name: &str) -> Option<Self> {
        match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensor),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => Some(Global::RebuildParameter),
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch", _) => STORAGES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(n, d)| Global::Storage(n, d))
                .or_else(|| DTYPES.iter().find(|n| **n == name).map(|&n| Global::Dtype(n))),
            _ => None,
        }
    }
}

/// A storage a tensor points into: persistent id `('storage', type, key, location, numel, ...)`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StorageRef {
    /// The storage's file (zip: `data/<key>`) or position (legacy) key.
    pub key: String,
    /// The element type's name (`FloatStorage`) and dtype.
    pub kind: (&'static str, Option<DType>),
    /// Number of elements.
    pub numel: usize,
}

/// What `_rebuild_tensor_v2` describes: a strided view into a storage.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TensorRef {
    /// The storage.
    pub storage: Rc<StorageRef>,
    /// First element, in elements.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
}

/// A Python value as the unpickler builds it. Tuples, lists and dicts are indices into the
/// [`Heap`] of their pickle: a pickle fills a container after memoising it and may refer to it
/// again (itself included), and values stay flat, so no nesting depth a file chooses can
/// overflow the stack when they are dropped.
#[derive(Debug, Clone)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond 64 bits, as its little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    /// A float; checkpoints' floats (hyper-parameters) carry no tensors, so the value is dropped.
    Float,
    /// Shared, as Python shares it: a memoised string may be referred to many times.
    Str(Rc<str>),
    /// Bytes, dropped like floats.
    Bytes,
    Tuple(usize),
    List(usize),
    Dict(usize),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// The Python type, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class or function",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// The containers of one pickle: tuples and lists in `seqs`, dicts (key order kept) in `dicts`.
#[derive(Debug, Default)]
pub(super) struct Heap {
    seqs: Vec<Vec<Value>>,
    dicts: Vec<Vec<(Value, Value)>>,
}

impl Heap {
    /// The items of tuple or list `id`.
    pub fn seq(&self, id: usize) -> &[Value] {
        &self.seqs[id]
    }

    /// The items of dict `id`.
    pub fn dict(&self, id: usize) -> &[(Value, Value)] {
        &self.dicts[id]
    }

    fn tuple(&mut self, items: Vec<Value>) -> Value {
        self.seqs.push(items);
        Value::Tuple(self.seqs.len() - 1)
    }

    fn list(&mut self, items: Vec<Value>) -> Value {
        self.seqs.push(items);
        Value::List(self.seqs.len() - 1)
    }

    fn new_dict(&mut self, items: Vec<(Value, Value)>) -> Value {
        self.dicts.push(items);
        Value::Dict(self.dicts.len() - 1)
    }

    /// The items of `v` when it is a tuple.
    pub fn as_tuple(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::Tuple(id) => Some(self.seq(*id)),
            _ => None,
        }
    }
}

/// Why unpickling failed: a refused global (`module.name`) or anything else.
#[derive(Debug)]
pub(super) enum Fault {
    /// A global outside the allow-list.
    Unsafe(String),
    /// A malformed or unsupported pickle.
    Bad(String),
}

type Step<T> = std::result::Result<T, Fault>;

fn bad<T>(reason: impl Into<String>) -> Step<T> {
    Err(Fault::Bad(reason.into()))
}

/// Turns a persistent id into a value (torch: a storage).
pub(super) type PersistentLoad<'a> = &'a mut dyn FnMut(Value, &Heap) -> Step<Value>;

/// Reads one pickle from `data[*pos..]`, leaving `*pos` after its STOP opcode: the object and
/// the containers it refers to.
pub(super) fn unpickle(data: &[u8], pos: &mut usize, persistent_load: PersistentLoad) -> Step<(Value, Heap)> {
    let mut m = Machine {
        data,
        pos: *pos,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        heap: Heap::default(),
    };
    let v = m.run(persistent_load)?;
    *pos = m.pos;
    Ok((v, m.heap))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    heap: Heap,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => bad(format!("truncated: {n} bytes wanted at byte {}", self.pos)),
        }
    }

    fn uint(&mut self, n: usize) -> Step<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    fn len(&mut self, n: usize) -> Step<usize> {
        let l = self.uint(n)?;
        usize::try_from(l)
            .ok()
            .filter(|&l| l <= self.data.len())
            .map_or_else(|| bad(format!("length {l} at byte {} exceeds the file", self.pos)), Ok)
    }

    fn line(&mut self) -> Step<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| Fault::Bad("unterminated line".into()))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| Fault::Bad("a line is not UTF-8".into()))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn text(&mut self, n: usize) -> Step<Value> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map(|s| Value::Str(s.into()))
            .map_err(|_| Fault::Bad("a string is not UTF-8".into()))
    }

    fn pop(&mut self) -> Step<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return bad(format!("stack underflow at byte {}", self.pos));
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&mut self) -> Step<&mut Value> {
        match self.stack.last_mut() {
            Some(v) => Ok(v),
            None => bad("stack underflow"),
        }
    }

    /// The values pushed since the last MARK, removing the mark.
    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let Some(at) = self.marks.pop() else {
            return bad("no MARK to pop to");
        };
        Ok(self.stack.split_off(at))
    }

    fn global(&mut self, module: &str, name: &str) -> Step<()> {
        match Global::resolve(module, name) {
            Some(g) => {
                self.stack.push(Value::Global(g));
                Ok(())
            }
            None => Err(Fault::Unsafe(format!("{module}.{name}"))),
        }
    }

    fn memo_put(&mut self, id: u32) -> Step<()> {
        let v = self.top()?.clone();
        self.memo.insert(id, v);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Step<()> {
        match self.memo.get(&id) {
            Some(v) => {
                self.stack.push(v.clone());
                Ok(())
            }
            None => bad(format!("memo entry {id} is not set")),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Step<()> {
        if items.len() % 2 != 0 {
            return bad("SETITEMS with an odd number of values");
        }
        let &mut Value::Dict(id) = self.top()? else {
            return bad("SETITEM(S) on something other than a dict");
        };
        let d = &mut self.heap.dicts[id];
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            dict_insert(d, k, v);
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Step<()> {
        match *self.top()? {
            Value::List(id) => {
                self.heap.seqs[id].extend(items);
                Ok(())
            }
            ref other => bad(format!("APPEND(S) on a {}", other.kind())),
        }
    }

    fn run(&mut self, persistent_load: PersistentLoad) -> Step<Value> {
        loop {
            let at = self.pos;
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    let proto = self.take(1)?[0];
                    if proto > 5 {
                        return bad(format!("pickle protocol {proto} (up to 5 is known)"));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.uint(1)?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.len(1)? } else { self.len(4)? };
                    if n > 16 {
                        // Each reference would copy it; torch.save's largest is the 10-byte magic.
                        return bad(format!("an integer of {n} bytes at byte {at}"));
                    }
                    let b = self.take(n)?;
                    self.stack.push(long(b));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float);
                }
                b'X' => {
                    let n = self.len(4)?;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.len(1)?;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.len(8)?;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                // Python 2 `str` (BINSTRING, SHORT_BINSTRING): bytes read as Latin-1, as Python 3's
                // `encoding="latin1"` does.
                b'T' | b'U' => {
                    let n = if op == b'T' { self.len(4)? } else { self.len(1)? };
                    let s: String = self.take(n)?.iter().map(|&b| char::from(b)).collect();
                    self.stack.push(Value::Str(Rc::from(s)));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => self.len(1)?,
                        b'B' => self.len(4)?,
                        _ => self.len(8)?,
                    };
                    self.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b')' => {
                    let t = self.heap.tuple(Vec::new());
                    self.stack.push(t);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let t = self.heap.tuple(items);
                    self.stack.push(t);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = (0..n).map(|_| self.pop()).collect::<Step<Vec<_>>>()?;
                    items.reverse();
                    let t = self.heap.tuple(items);
                    self.stack.push(t);
                }
                // Sets hold no tensors in a checkpoint; kept as lists.
                b']' | 0x8f => {
                    let l = self.heap.list(Vec::new());
                    self.stack.push(l);
                }
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    let l = self.heap.list(items);
                    self.stack.push(l);
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => {
                    let d = self.heap.new_dict(Vec::new());
                    self.stack.push(d);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = self.heap.new_dict(Vec::new());
                    self.stack.push(d);
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                // BINPUT / LONG_BINPUT, BINGET / LONG_BINGET: a 1- or 4-byte memo index.
                b'q' | b'r' => {
                    let id = self.uint(if op == b'q' { 1 } else { 4 })? as u32;
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = self.memo.len() as u32;
                    self.memo_put(id)?;
                }
                b'h' | b'j' => {
                    let id = self.uint(if op == b'h' { 1 } else { 4 })? as u32;
                    self.memo_get(id)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                // INST reads a class like GLOBAL and calls it: refused unless allowed, and no
                // allowed global is built that way by torch.
                b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                    return bad(format!("INST of {module}.{name} at byte {at} (not written by torch.save)"));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(&m, &n)?,
                        _ => return bad("STACK_GLOBAL needs two strings"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(pid, &self.heap)?;
                    self.stack.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = call(f, args, &mut self.heap)?;
                    self.stack.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match cls {
                        Value::Global(Global::OrderedDict) => {
                            let d = self.heap.new_dict(Vec::new());
                            self.stack.push(d);
                        }
                        other => return bad(format!("NEWOBJ of a {} at byte {at}", other.kind())),
                    }
                    drop(args);
                }
                b'b' => {
                    let state = self.pop()?;
                    match self.top()? {
                        // `state_dict()` is an OrderedDict with a `_metadata` attribute (module
                        // versions); attributes carry no tensors.
                        Value::Dict(_) => {}
                        other => {
                            return bad(format!(
                                "BUILD of a {} with a {} state at byte {at}",
                                other.kind(),
                                state.kind()
                            ))
                        }
                    }
                }
                _ => {
                    return bad(format!(
                        "unsupported pickle opcode 0x{op:02x} at byte {at} (protocols 2 to 5 as torch.save writes them are read)"
                    ))
                }
            }
        }
    }
}

/// A little-endian two's-complement integer (LONG1, LONG4).
fn long(b: &[u8]) -> Value {
    if b.len() > 8 {
        return Value::BigInt(b.to_vec());
    }
    let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
        0xff
    } else {
        0
    };
    let mut w = [fill; 8];
    w[..b.len()].copy_from_slice(b);
    Value::Int(i64::from_le_bytes(w))
}

/// Sets `k` to `v`, replacing an equal string or integer key, as a Python dict does.
fn dict_insert(d: &mut Vec<(Value, Value)>, k: Value, v: Value) {
    let same = |a: &Value| match (a, &k) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    };
    match d.iter_mut().find(|(a, _)| same(a)) {
        Some(slot) => slot.1 = v,
        None => d.push((k, v)),
    }
}

/// REDUCE: applies an allowed global to its arguments.
fn call(f: Value, args: Value, heap: &mut Heap) -> Step<Value> {
    let Value::Tuple(id) = args else {
        return bad(format!("REDUCE arguments are a {}, not a tuple", args.kind()));
    };
    let args = heap.seq(id).to_vec();
    match f {
        Value::Global(Global::RebuildTensor) => rebuild_tensor(&args, heap),
        Value::Global(Global::RebuildParameter) => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            other => bad(format!(
                "_rebuild_parameter of a {}",
                other.as_ref().map_or("nothing", Value::kind)
            )),
        },
        Value::Global(Global::OrderedDict) => match args.as_slice() {
            [] => Ok(heap.new_dict(Vec::new())),
            [Value::List(items)] => {
                let mut d = Vec::new();
                for item in heap.seq(*items) {
                    match heap.as_tuple(item) {
                        Some([k, v]) => dict_insert(&mut d, k.clone(), v.clone()),
                        _ => return bad(format!("OrderedDict item is a {}, not a pair", item.kind())),
                    }
                }
                Ok(heap.new_dict(d))
            }
            _ => bad("OrderedDict called with unexpected arguments"),
        },
        Value::Global(g) => bad(format!("{g:?} cannot be called")),
        other => bad(format!("REDUCE of a {}", other.kind())),
    }
}

fn index(v: &Value, what: &str) -> Step<usize> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        Value::Int(i) => bad(format!("_rebuild_tensor_v2: {what} is {i}, not a size")),
        other => bad(format!("_rebuild_tensor_v2: {what} is a {}, not a size", other.kind())),
    }
}

fn sizes(v: &Value, what: &str, heap: &Heap) -> Step<Vec<usize>> {
    match heap.as_tuple(v) {
        Some(items) => items.iter().map(|x| index(x, what)).collect(),
        None => bad(format!("_rebuild_tensor_v2: {what} is a {}, not a tuple", v.kind())),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`.
fn rebuild_tensor(args: &[Value], heap: &Heap) -> Step<Value> {
    let [storage, offset, size, stride, ..] = args else {
        return bad(format!("_rebuild_tensor_v2 with {} arguments", args.len()));
    };
    let Value::Storage(storage) = storage else {
        return bad(format!("_rebuild_tensor_v2 of a {}, not a storage", storage.kind()));
    };
    let t = TensorRef {
        storage: storage.clone(),
        offset: index(offset, "storage_offset")?,
        shape: sizes(size, "size", heap)?,
        stride: sizes(stride, "stride", heap)?,
    };
    if t.shape.len() != t.stride.len() {
        return bad(format!(
            "tensor size {:?} and stride {:?} differ in rank",
            t.shape, t.stride
        ));
    }
    Ok(Value::Tensor(Rc::new(t)))
}

/// torch's persistent id `('storage', storage_type, key, location, numel[, view_metadata])`
/// as a storage.
pub(super) fn storage_from_pid(pid: Value, heap: &Heap) -> Step<Value> {
    let Some(items) = heap.as_tuple(&pid) else {
        return bad(format!("persistent id is a {}, not a tuple", pid.kind()));
    };
    match items {
        [Value::Str(tag), Value::Global(Global::Storage(name, dtype)), key, _location, numel, rest @ ..]
            if &**tag == "storage" =>
        {
            if rest.iter().any(|v| !matches!(v, Value::None)) {
                return bad("storage views (torch < 0.4 legacy files) are not supported");
            }
            let key = match key {
                Value::Str(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                other => return bad(format!("storage key is a {}", other.kind())),
            };
            Ok(Value::Storage(Rc::new(StorageRef {
                key,
                kind: (name, *dtype),
                numel: index(numel, "storage numel")?,
            })))
        }
        // Values are described by kind only: a pickle can make a list that contains itself.
        _ => bad(format!(
            "unsupported persistent id ({})",
            items.iter().map(Value::kind).collect::<Vec<_>>().join(", ")
        )),
    }
}
