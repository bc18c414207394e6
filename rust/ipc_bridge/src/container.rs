//! Media frames as they are: a flat dict, tuple or list holding arrays next to a little
//! metadata (`{"t": ts, "rate": 16000, "data": samples}`), encoded without pickle. The format
//! is defined by `remotemedia/frames.py` (`CT_TAG`, `_encode_container`), which encodes and
//! decodes it too; `tests/test_serialization.py` checks that both sides agree.
//!
//! ```text
//! meta   = b"RMC1" u8 kind (0 dict, 1 tuple, 2 list) u32 count, then count entries
//! entry  = [u16 key length, key utf-8] (dicts only) value
//! value  = u8 tag, then: 0 None | 1 False | 2 True | 3 int: i64 | 4 float: f64
//!          | 5 str: u32 length, utf-8 | 6 bytes: u32 length, bytes
//!          | 7 array: u8 dtype length, dtype.str, u8 ndim, ndim x i64 shape, u32 buffer index
//! (little-endian; an array's bytes are the frame's out-of-band buffer number `index`)
//! ```
//!
//! Anything else (nesting, an int beyond 64 bits, a non-contiguous array, a key that is not a
//! str) is not a container frame: it is pickled.

use crate::fasthash::FastMap;

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

pub const CT_TAG: &[u8; 4] = b"RMC1";
const MAX_ENTRIES: usize = 64;
/// Longest scalar (tag and bytes) a decoder keeps to compare the next frame's with.
const RECENT_MAX: usize = 64;

/// A frame's out-of-band buffers (the arrays themselves).
pub(crate) type Buffers = Vec<Py<PyAny>>;
/// An array of an encoded frame: the array, and the address and length of its bytes (valid
/// while the array is).
pub(crate) type Part = (Py<PyAny>, usize, usize);
/// `(meta, parts)` of an encoded container frame.
pub(crate) type Encoded = (Vec<u8>, Vec<Part>);

const T_NONE: u8 = 0;
const T_FALSE: u8 = 1;
const T_TRUE: u8 = 2;
const T_INT: u8 = 3;
const T_FLOAT: u8 = 4;
const T_STR: u8 = 5;
const T_BYTES: u8 = 6;
const T_ARRAY: u8 = 7;

/// A dtype's `.str` and itemsize.
type DtypeCode = (Vec<u8>, usize);

/// What the codec needs from numpy, and what it learned of dtypes.
pub(crate) struct Codec {
    ndarray: Py<PyAny>,
    dtype: Py<PyAny>,
    /// dtype object address -> the object (kept alive: its address cannot name another dtype
    /// while it is cached) and its `.str` and itemsize (None: not encodable, e.g. objects,
    /// records)
    enc: FastMap<usize, (Py<PyAny>, Option<DtypeCode>)>,
    /// `.str` -> (dtype object, itemsize)
    dec: FastMap<Vec<u8>, (Py<PyAny>, usize)>,
    /// keys of received dicts
    keys: FastMap<Vec<u8>, Py<PyString>>,
    /// the entries of the last frame decoded, by position: a stream's frames repeat their
    /// keys and most of their values (a rate, a channel count, a codec name)
    recent: Vec<Recent>,
    /// the vectors of the last frame encoded, empty, for the next (see `recycle`)
    scratch: Option<Encoded>,
    /// the keys of the last dict encoded, by position, with their encoding (u16 length,
    /// utf-8): a stream's dicts repeat the same key objects (held here: an address names the
    /// same str while it is)
    enc_keys: Vec<(Py<PyString>, Vec<u8>)>,
    /// the last dtype decoded: its `.str`, object and itemsize (a stream's arrays share one:
    /// one compare, no hash)
    last_dtype: Option<(Vec<u8>, Py<PyAny>, usize)>,
}

/// An entry of the last frame decoded: its key's and value's bytes in the meta, and the
/// objects made of them (values only when immutable scalars: None, bools, numbers, str,
/// bytes; never arrays).
#[derive(Default)]
struct Recent {
    key_raw: Vec<u8>,
    key: Option<Py<PyString>>,
    value_raw: Vec<u8>,
    value: Option<Py<PyAny>>,
}

impl Codec {
    /// numpy's pieces, imported.
    pub(crate) fn new(py: Python<'_>) -> PyResult<Self> {
        let np = py.import(intern!(py, "numpy"))?;
        Ok(Codec {
            ndarray: np.getattr(intern!(py, "ndarray"))?.unbind(),
            dtype: np.getattr(intern!(py, "dtype"))?.unbind(),
            enc: FastMap::default(),
            dec: FastMap::default(),
            keys: FastMap::default(),
            recent: Vec::new(),
            scratch: None,
            enc_keys: Vec::new(),
            last_dtype: None,
        })
    }

    /// Learns how `dtype` (not in `enc` yet) is encoded.
    fn learn_dtype(&mut self, dtype: &Bound<'_, PyAny>) -> PyResult<()> {
        let key = dtype.as_ptr() as usize;
        let py = dtype.py();
        let ok = !dtype.getattr(intern!(py, "hasobject"))?.is_truthy()? && dtype.getattr(intern!(py, "names"))?.is_none();
        let s = if ok {
            let n: usize = dtype.getattr(intern!(py, "itemsize"))?.extract()?;
            Some((dtype.getattr(intern!(py, "str"))?.extract::<String>()?.into_bytes(), n))
        } else {
            None
        };
        // Builtin dtypes are singletons; others are made per array: keep the cache small.
        if self.enc.len() > 256 {
            self.enc.clear();
        }
        if let Some((k, n)) = &s
            && !self.dec.contains_key(k)
        {
            self.dec.insert(k.clone(), (dtype.clone().unbind(), *n));
        }
        self.enc.insert(key, (dtype.clone().unbind(), s));
        Ok(())
    }

    fn value(&mut self, v: &Bound<'_, PyAny>, meta: &mut Vec<u8>, bufs: &mut Vec<Part>) -> PyResult<bool> {
        // (a media frame's samples first: an exact ndarray, its type compared by address)
        if unsafe { ffi::Py_TYPE(v.as_ptr()) } as *mut ffi::PyObject == self.ndarray.as_ptr() {
            return self.array_value(v, meta, bufs);
        }
        if v.is_none() {
            meta.push(T_NONE);
        } else if v.is_exact_instance_of::<PyBool>() {
            meta.push(if v.is_truthy()? { T_TRUE } else { T_FALSE });
        } else if v.is_exact_instance_of::<PyInt>() {
            // (the C API directly: pyo3's extract costs as much as the rest of the entry)
            let mut overflow = 0;
            // SAFETY: an exact int; its only failure is overflow, which is reported
            let i = unsafe { ffi::PyLong_AsLongLongAndOverflow(v.as_ptr(), &mut overflow) };
            if overflow != 0 {
                return Ok(false); // (beyond 64 bits: pickle it)
            }
            meta.push(T_INT);
            meta.extend_from_slice(&i.to_le_bytes());
        } else if v.is_exact_instance_of::<PyFloat>() {
            meta.push(T_FLOAT);
            // SAFETY: an exact float
            meta.extend_from_slice(&unsafe { ffi::PyFloat_AS_DOUBLE(v.as_ptr()) }.to_le_bytes());
        } else if let Ok(s) = v.cast_exact::<PyString>() {
            let s = s.to_str()?;
            meta.push(T_STR);
            meta.extend_from_slice(&(s.len() as u32).to_le_bytes());
            meta.extend_from_slice(s.as_bytes());
        } else if let Ok(b) = v.cast_exact::<PyBytes>() {
            let b = b.as_bytes();
            if b.len() > 4096 {
                return Ok(false); // (big bytes belong out of band: pickle does that)
            }
            meta.push(T_BYTES);
            meta.extend_from_slice(&(b.len() as u32).to_le_bytes());
            meta.extend_from_slice(b);
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// An exact ndarray's entry (see `value`).
    fn array_value(&mut self, v: &Bound<'_, PyAny>, meta: &mut Vec<u8>, bufs: &mut Vec<Part>) -> PyResult<bool> {
        let py = v.py();
        // (read from the array's fields: no buffer request, no shape tuple per frame)
        let Some(a) = crate::ndarray::contiguous(v) else { return Ok(false) };
        let key = a.descr as usize;
        let code = match self.enc.get(&key) {
            Some(c) => c,
            None => {
                let descr = unsafe { Bound::from_borrowed_ptr(py, a.descr) };
                self.learn_dtype(&descr)?;
                &self.enc[&key]
            }
        };
        let (_, Some((dt, itemsize))) = code else { return Ok(false) };
        let nbytes = a.dims.iter().try_fold(*itemsize, |n, &d| n.checked_mul(usize::try_from(d).ok()?));
        let Some(nbytes) = nbytes.filter(|&n| n > 0) else { return Ok(false) };
        if dt.len() > 255 || a.dims.len() > 255 {
            return Ok(false);
        }
        meta.push(T_ARRAY);
        meta.push(dt.len() as u8);
        meta.extend_from_slice(dt);
        meta.push(a.dims.len() as u8);
        for &n in a.dims {
            meta.extend_from_slice(&(n as i64).to_le_bytes());
        }
        meta.extend_from_slice(&(bufs.len() as u32).to_le_bytes());
        bufs.push((v.clone().unbind(), a.data as usize, nbytes));
        Ok(true)
    }

    /// `(meta, buffers)` of a container frame, or None when `obj` is not one (then pickle it).
    /// A container without any array is not one either: small pickles are as fast. Hand the
    /// result to [`recycle`](Self::recycle) when done with it: the next frame reuses its vectors.
    pub(crate) fn encode(&mut self, obj: &Bound<'_, PyAny>) -> PyResult<Option<Encoded>> {
        let (mut meta, mut bufs) = self.scratch.take().unwrap_or_else(|| (Vec::with_capacity(96), Vec::new()));
        meta.clear();
        bufs.clear();
        if self.encode_into(obj, &mut meta, &mut bufs)? {
            Ok(Some((meta, bufs)))
        } else {
            self.recycle((meta, bufs));
            Ok(None)
        }
    }

    /// The vectors of a frame [`encode`](Self::encode) made, for its next frame (their
    /// references to arrays dropped now: an array may view a received chunk).
    pub(crate) fn recycle(&mut self, (mut meta, mut parts): Encoded) {
        meta.clear();
        parts.clear();
        self.scratch = Some((meta, parts));
    }

    /// Appends `obj`'s encoding to `meta` and `bufs` (both empty); false when it is not a
    /// container frame.
    fn encode_into(&mut self, obj: &Bound<'_, PyAny>, meta: &mut Vec<u8>, bufs: &mut Vec<Part>) -> PyResult<bool> {
        meta.extend_from_slice(CT_TAG);
        if let Ok(d) = obj.cast_exact::<PyDict>() {
            if d.len() > MAX_ENTRIES {
                return Ok(false);
            }
            meta.push(0);
            meta.extend_from_slice(&(d.len() as u32).to_le_bytes());
            let py = obj.py();
            let (mut pos, mut key, mut value): (ffi::Py_ssize_t, *mut ffi::PyObject, *mut ffi::PyObject) =
                (0, std::ptr::null_mut(), std::ptr::null_mut());
            let mut i = 0;
            // (PyDict_Next: no iterator object; each value is held while it is encoded)
            while unsafe { ffi::PyDict_Next(d.as_ptr(), &mut pos, &mut key, &mut value) } != 0 {
                match self.enc_keys.get(i) {
                    Some((k, raw)) if k.as_ptr() == key => meta.extend_from_slice(raw),
                    _ => {
                        let k = unsafe { Bound::from_borrowed_ptr(py, key) };
                        let Ok(k) = k.cast_exact::<PyString>() else { return Ok(false) };
                        let s = k.to_str()?;
                        if s.len() > u16::MAX as usize {
                            return Ok(false);
                        }
                        let mut raw = Vec::with_capacity(2 + s.len());
                        raw.extend_from_slice(&(s.len() as u16).to_le_bytes());
                        raw.extend_from_slice(s.as_bytes());
                        meta.extend_from_slice(&raw);
                        self.enc_keys.truncate(i);
                        if i < MAX_ENTRIES {
                            self.enc_keys.push((k.clone().unbind(), raw));
                        }
                    }
                }
                i += 1;
                let value = unsafe { Bound::from_borrowed_ptr(py, value) };
                if !self.value(&value, meta, bufs)? {
                    return Ok(false);
                }
            }
            if i != d.len() {
                return Ok(false); // (changed while encoded: pickle decides)
            }
        } else {
            let (kind, items): (u8, Vec<Bound<'_, PyAny>>) = if let Ok(t) = obj.cast_exact::<PyTuple>() {
                (1, t.iter().collect())
            } else if let Ok(l) = obj.cast_exact::<PyList>() {
                (2, l.iter().collect())
            } else {
                return Ok(false);
            };
            if items.len() > MAX_ENTRIES {
                return Ok(false);
            }
            meta.push(kind);
            meta.extend_from_slice(&(items.len() as u32).to_le_bytes());
            for v in &items {
                if !self.value(v, meta, bufs)? {
                    return Ok(false);
                }
            }
        }
        Ok(!bufs.is_empty())
    }

    /// Rebuilds a container frame; its arrays are read-only views on `source`, whose memory
    /// starts at `base` (a Sample: zero copy; or bytes of a private copy), buffer `i` at
    /// `offsets[i]` of it.
    ///
    /// # Safety
    /// Every `(offset, len)` of `offsets` must lie in the memory `source` owns at `base`.
    pub(crate) unsafe fn decode<'py>(
        &mut self,
        py: Python<'py>,
        meta: &[u8],
        source: &Bound<'py, PyAny>,
        base: usize,
        offsets: &[(usize, usize)],
    ) -> PyResult<Bound<'py, PyAny>> {
        let bad = || pyo3::exceptions::PyValueError::new_err("malformed container frame meta");
        let mut r = Reader { b: meta, i: 4 };
        let kind = r.u8().ok_or_else(bad)?;
        let n = r.u32().ok_or_else(bad)? as usize;
        if n > MAX_ENTRIES || kind > 2 {
            return Err(bad());
        }
        // (a dict's entries go into `dict`, a tuple's or list's into `items`)
        let dict = (kind == 0).then(|| PyDict::new(py));
        let mut items: Option<Vec<Bound<'py, PyAny>>> = (kind != 0).then(|| Vec::with_capacity(n));
        if self.recent.len() < n {
            self.recent.resize_with(n, Recent::default);
        }
        // (keys and repeated scalars are lent from `recent`, which holds them: no reference
        // counted per entry but the dict's own)
        for i in 0..n {
            if kind == 0 {
                let len = r.u16().ok_or_else(bad)? as usize;
                let raw = r.take(len).ok_or_else(bad)?;
                if self.recent[i].key.is_none() || self.recent[i].key_raw != raw {
                    let k = self.key(py, raw)?;
                    let recent = &mut self.recent[i];
                    recent.key_raw.clear();
                    recent.key_raw.extend_from_slice(raw);
                    recent.key = Some(k);
                }
            }
            let fresh = if r.b.get(r.i) == Some(&T_ARRAY) {
                Some(self.read_array(py, &mut r, source, base, offsets).ok_or_else(bad)??)
            } else {
                // (a scalar: the same bytes as this entry of the last frame make the same
                // immutable object)
                let start = r.i;
                let (tag, payload) = scalar(&mut r).ok_or_else(bad)?;
                let raw = &meta[start..r.i];
                let recent = &mut self.recent[i];
                if recent.value.is_some() && recent.value_raw == raw {
                    None
                } else {
                    let v = scalar_object(py, tag, payload).ok_or_else(bad)??;
                    if raw.len() > RECENT_MAX {
                        Some(v)
                    } else {
                        recent.value_raw.clear();
                        recent.value_raw.extend_from_slice(raw);
                        recent.value = Some(v.unbind());
                        None
                    }
                }
            };
            let recent = &self.recent[i];
            let v = match &fresh {
                Some(v) => v,
                None => recent.value.as_ref().expect("a recent scalar").bind(py),
            };
            match (&dict, &mut items, &recent.key) {
                (Some(dict), _, Some(k)) => dict.set_item(k.bind(py), v)?,
                (_, Some(items), _) => items.push(v.clone()),
                _ => unreachable!("a dict's entries have keys"),
            }
        }
        Ok(match (dict, items) {
            (Some(dict), _) => dict.into_any(),
            (_, Some(items)) if kind == 1 => PyTuple::new(py, items)?.into_any(),
            (_, Some(items)) => PyList::new(py, items)?.into_any(),
            _ => unreachable!("a dict or a sequence"),
        })
    }

    /// A key of a received dict: the same str object for the same bytes (a stream's frames
    /// repeat their keys; dict lookups then compare by identity).
    fn key(&mut self, py: Python<'_>, raw: &[u8]) -> PyResult<Py<PyString>> {
        if let Some(k) = self.keys.get(raw) {
            return Ok(k.clone_ref(py));
        }
        let s = std::str::from_utf8(raw).map_err(|_| pyo3::exceptions::PyValueError::new_err("malformed container frame meta"))?;
        let k = PyString::intern(py, s).unbind();
        if self.keys.len() > 1024 {
            self.keys.clear();
        }
        self.keys.insert(raw.to_vec(), k.clone_ref(py));
        Ok(k)
    }

    /// An array value (its tag next in `r`).
    fn read_array<'py>(&mut self, py: Python<'py>, r: &mut Reader<'_>, source: &Bound<'py, PyAny>, base: usize, offsets: &[(usize, usize)]) -> Option<PyResult<Bound<'py, PyAny>>> {
        if r.u8()? != T_ARRAY {
            return None;
        }
        let dlen = r.u8()? as usize;
        let dt = r.take(dlen)?;
        let ndim = r.u8()? as usize;
        let shape = r.take(ndim.checked_mul(8)?)?; // (ndim little-endian i64)
        let index = r.u32()? as usize;
        let &(offset, nbytes) = offsets.get(index)?;
        Some(self.array(py, dt, shape, source, base + offset, nbytes))
    }

    /// An array of dtype `.str` `dt` and shape `shape` (`ndim` little-endian i64) over the
    /// `nbytes` at `data`, which `source` owns.
    fn array<'py>(&mut self, py: Python<'py>, dt: &[u8], shape: &[u8], source: &Bound<'py, PyAny>, data: usize, nbytes: usize) -> PyResult<Bound<'py, PyAny>> {
        let bad = |what: &str| pyo3::exceptions::PyValueError::new_err(format!("malformed container frame meta: {what}"));
        if !matches!(&self.last_dtype, Some((raw, _, _)) if raw.as_slice() == dt) {
            let (d, n) = match self.dec.get(dt) {
                Some((d, n)) => (d.clone_ref(py), *n),
                None => {
                    let text = std::str::from_utf8(dt).map_err(|_| bad("dtype"))?;
                    let d = self.dtype.bind(py).call1((text,)).map_err(|e| bad(&format!("dtype {text:?}: {e}")))?;
                    // (an array of Python objects over received bytes would be pointers from another
                    // process; records and sub-arrays are never sent: refused as Python's decoder does)
                    if d.getattr(intern!(py, "hasobject"))?.is_truthy()? {
                        return Err(bad("a dtype holding Python objects"));
                    }
                    if !d.getattr(intern!(py, "names"))?.is_none() || !d.getattr(intern!(py, "subdtype"))?.is_none() {
                        return Err(bad(&format!("dtype {text:?} is not a plain one")));
                    }
                    let n: usize = d.getattr(intern!(py, "itemsize"))?.extract()?;
                    self.dec.insert(dt.to_vec(), (d.clone().unbind(), n));
                    (d.unbind(), n)
                }
            };
            self.last_dtype = Some((dt.to_vec(), d, n));
        }
        let Some((_, dtype, itemsize)) = &self.last_dtype else { unreachable!("set above") };
        let (dtype, itemsize) = (dtype.bind(py), *itemsize);
        // (an encoder sends whole items, never of size 0: as Python's frombuffer, refuse others)
        let count = nbytes.checked_div(itemsize).filter(|c| c * itemsize == nbytes).ok_or_else(|| bad("the buffer is not whole items"))?;
        let ndim = shape.len() / 8;
        // (count x itemsize <= nbytes: inside the buffer)
        if ndim == 1 {
            // (a stream's samples, most frames: no scratch dims)
            if i64::from_le_bytes(shape.try_into().expect("8 bytes")) != count as i64 {
                return Err(bad("shape does not match the buffer"));
            }
            return unsafe { crate::ndarray::view(dtype, &[count as isize], data as *const u8, source.clone()) };
        }
        let mut dims = [0isize; 32];
        if ndim > dims.len() {
            return Err(bad("more than 32 dimensions"));
        }
        let mut n = 1usize;
        for (d, raw) in dims.iter_mut().zip(shape.chunks_exact(8)) {
            let v = i64::from_le_bytes(raw.try_into().expect("8 bytes"));
            *d = isize::try_from(v).map_err(|_| bad("shape"))?;
            n = usize::try_from(v).ok().and_then(|v| n.checked_mul(v)).ok_or_else(|| bad("shape"))?;
        }
        if n != count {
            return Err(bad("shape does not match the buffer"));
        }
        unsafe { crate::ndarray::view(dtype, &dims[..ndim], data as *const u8, source.clone()) }
    }
}

/// A scalar value's tag and payload bytes (for a str or bytes, without its length).
fn scalar<'a>(r: &mut Reader<'a>) -> Option<(u8, &'a [u8])> {
    let tag = r.u8()?;
    let payload = match tag {
        T_NONE | T_FALSE | T_TRUE => &[][..],
        T_INT | T_FLOAT => r.take(8)?,
        T_STR | T_BYTES => {
            let len = r.u32()? as usize;
            r.take(len)?
        }
        _ => return None,
    };
    Some((tag, payload))
}

/// The object of a scalar value (see `scalar`); None when malformed.
fn scalar_object<'py>(py: Python<'py>, tag: u8, payload: &[u8]) -> Option<PyResult<Bound<'py, PyAny>>> {
    Some(match tag {
        T_NONE => Ok(py.None().into_bound(py)),
        T_FALSE => Ok(PyBool::new(py, false).to_owned().into_any()),
        T_TRUE => Ok(PyBool::new(py, true).to_owned().into_any()),
        T_INT => Ok(i64::from_le_bytes(payload.try_into().ok()?).into_pyobject(py).ok()?.into_any()),
        T_FLOAT => Ok(PyFloat::new(py, f64::from_le_bytes(payload.try_into().ok()?)).into_any()),
        T_STR => Ok(PyString::new(py, std::str::from_utf8(payload).ok()?).into_any()),
        T_BYTES => Ok(PyBytes::new(py, payload).into_any()),
        _ => return None,
    })
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.i..self.i.checked_add(n)?)?;
        self.i += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// The container encoding of `obj` as `(meta, buffers)`, or None when it is not a container
/// frame (for tests: the workers' loop encodes them itself).
#[pyfunction]
pub fn encode_container(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Option<(Py<PyBytes>, Buffers)>> {
    Ok(Codec::new(py)?.encode(obj)?.map(|(meta, parts)| (PyBytes::new(py, &meta).unbind(), parts.into_iter().map(|p| p.0).collect())))
}
