//! The two calls of numpy's C API the hot path needs: a read-only array viewing memory another
//! object owns (a received frame's chunk, or a private copy of it).
//!
//! `numpy.frombuffer(sample, dtype, count, offset)` did the same through Python: its argument
//! parsing, then the buffer protocol, where it first asks for a writable view of a read-only
//! chunk and clears the error that raises, on every frame. Here the array is made directly from
//! the pointer, its dtype object and its shape, and its base set to the owner (the chunk goes back
//! when the last view of it is gone, as before).
//!
//! The table is the capsule `_ARRAY_API` of numpy's `_multiarray_umath` (numpy 2:
//! `numpy._core`, numpy 1: `numpy.core`), as numpy's own `import_array()` finds it; the slot
//! numbers are part of numpy's ABI, the same in 1.x and 2.x.

use std::ffi::c_void;
use std::os::raw::c_int;
use std::sync::OnceLock;

use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

/// `PyArray_NewFromDescr(subtype, descr, nd, dims, strides, data, flags, obj)`
type NewFromDescr = unsafe extern "C" fn(
    *mut ffi::PyTypeObject,
    *mut ffi::PyObject,
    c_int,
    *const isize,
    *const isize,
    *mut c_void,
    c_int,
    *mut ffi::PyObject,
) -> *mut ffi::PyObject;
/// `PyArray_SetBaseObject(arr, obj)`: steals the reference to `obj`, also on failure.
type SetBaseObject = unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject) -> c_int;

const SLOT_ARRAY_TYPE: usize = 2;
const SLOT_NEW_FROM_DESCR: usize = 94;
const SLOT_SET_BASE_OBJECT: usize = 282;

struct Api {
    array_type: usize,
    new_from_descr: NewFromDescr,
    set_base_object: SetBaseObject,
}

static API: OnceLock<Api> = OnceLock::new();

fn api(py: Python<'_>) -> PyResult<&'static Api> {
    if let Some(a) = API.get() {
        return Ok(a);
    }
    let module = py
        .import("numpy._core._multiarray_umath")
        .or_else(|_| py.import("numpy.core._multiarray_umath"))
        .map_err(|e| PyRuntimeError::new_err(format!("numpy's C API is not available (numpy >= 1.24 is required): {e}")))?;
    let capsule = module.getattr("_ARRAY_API")?;
    let capsule = capsule
        .cast::<PyCapsule>()
        .map_err(|_| PyRuntimeError::new_err("numpy's _ARRAY_API is not a capsule"))?;
    let table = capsule.pointer_checked(None)?.as_ptr() as *const *const c_void;
    // (the table lives as long as numpy's extension module, which is never unloaded)
    let slot = |i: usize| unsafe { *table.add(i) };
    let a = Api {
        array_type: slot(SLOT_ARRAY_TYPE) as usize,
        new_from_descr: unsafe { std::mem::transmute::<*const c_void, NewFromDescr>(slot(SLOT_NEW_FROM_DESCR)) },
        set_base_object: unsafe { std::mem::transmute::<*const c_void, SetBaseObject>(slot(SLOT_SET_BASE_OBJECT)) },
    };
    Ok(API.get_or_init(|| a))
}

/// The leading fields of numpy's `PyArrayObject_fields` (ndarraytypes.h), the same in 1.x
/// and 2.x.
#[repr(C)]
struct Fields {
    ob_base: ffi::PyObject,
    data: *mut u8,
    nd: c_int,
    dimensions: *const isize,
    strides: *const isize,
    base: *mut ffi::PyObject,
    descr: *mut ffi::PyObject,
    flags: c_int,
}

const NPY_ARRAY_C_CONTIGUOUS: c_int = 0x0001;

/// What the hot path reads of an array without Python calls: its data, its dtype object and
/// its shape, when it is C-contiguous.
pub(crate) struct Contiguous<'a> {
    pub data: *const u8,
    pub descr: *mut ffi::PyObject,
    pub dims: &'a [isize],
}

/// `obj`'s data, dtype and shape when it is a C-contiguous numpy array (of any subclass);
/// None otherwise. The pointers are valid while `obj` is.
pub(crate) fn contiguous<'a>(obj: &'a Bound<'_, PyAny>) -> Option<Contiguous<'a>> {
    if !is_array(obj) {
        return None;
    }
    let f = unsafe { &*(obj.as_ptr() as *const Fields) };
    if f.flags & NPY_ARRAY_C_CONTIGUOUS == 0 || f.nd < 0 {
        return None;
    }
    let dims = if f.nd == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(f.dimensions, f.nd as usize) } };
    Some(Contiguous { data: f.data, descr: f.descr, dims })
}

/// `obj.base` of a numpy array (of any subclass), read from its fields (no attribute lookup);
/// None when `obj` is not an array or owns its data.
pub(crate) fn base<'py>(obj: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
    if !is_array(obj) {
        return None;
    }
    let f = unsafe { &*(obj.as_ptr() as *const Fields) };
    // SAFETY: an array's base is NULL or a reference the array holds
    (!f.base.is_null()).then(|| unsafe { Bound::from_borrowed_ptr(obj.py(), f.base) })
}

/// True when `obj` is a numpy array (of any subclass).
pub(crate) fn is_array(obj: &Bound<'_, PyAny>) -> bool {
    match api(obj.py()) {
        Ok(a) => unsafe { ffi::PyObject_TypeCheck(obj.as_ptr(), a.array_type as *mut ffi::PyTypeObject) != 0 },
        Err(_) => false,
    }
}

/// `numpy.dtype(obj)`: what [`view`] takes as its `descr` (checked once, when a port learns an
/// encoding, not per frame).
pub(crate) fn descr<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    api(py)?;
    let d = py.import("numpy")?.getattr("dtype")?.call1((obj,))?;
    // (an array of Python objects over shared memory would hold another process's pointers)
    if d.getattr("hasobject")?.is_truthy()? {
        return Err(pyo3::exceptions::PyValueError::new_err(format!("arrays of dtype {d} hold Python objects: they cannot be views on a frame")));
    }
    Ok(d)
}

/// A read-only, C-contiguous array of `descr` and shape `dims` over the memory at `data`,
/// which `owner` keeps alive (the array holds `owner` as its base).
///
/// # Safety
/// `descr` must be a `numpy.dtype` (see [`descr`]) and `data` must point to at least
/// `prod(dims) * descr.itemsize` bytes that stay valid and unchanged while `owner` is alive.
pub(crate) unsafe fn view<'py>(
    descr: &Bound<'py, PyAny>,
    dims: &[isize],
    data: *const u8,
    owner: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = descr.py();
    let a = api(py)?;
    unsafe {
        // (NewFromDescr steals a reference to the descr, also on failure)
        let d = descr.clone().into_ptr();
        let arr = (a.new_from_descr)(
            a.array_type as *mut ffi::PyTypeObject,
            d,
            dims.len() as c_int,
            dims.as_ptr(),
            std::ptr::null(),
            data as *mut c_void,
            0, // (no NPY_ARRAY_WRITEABLE: read-only; numpy works out contiguity and alignment)
            std::ptr::null_mut(),
        );
        let arr = Bound::from_owned_ptr_or_err(py, arr)?;
        if (a.set_base_object)(arr.as_ptr(), owner.into_ptr()) != 0 {
            return Err(PyErr::fetch(py));
        }
        Ok(arr)
    }
}
