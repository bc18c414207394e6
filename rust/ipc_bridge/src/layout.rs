//! Byte layout of one frame's payload, shared by the sending and the receiving side.
//!
//! ```text
//! payload = [ table: nbufs x (offset u64 LE, len u64 LE) ][ meta: meta_len bytes ]
//!           [ pad to 64 ][ buffer 0 ][ pad to 64 ][ buffer 1 ] ...
//! ```
//!
//! `meta` is opaque to the bridge (Python puts a protocol-5 pickle there); the buffers are the
//! pickle's out-of-band buffers. Each buffer starts on a 64-byte boundary of the payload so that
//! numpy views over it are aligned for any dtype and for SIMD loads. Offsets are relative to the
//! start of the payload, which iceoryx2 itself aligns.

/// Alignment of every out-of-band buffer inside the payload.
pub const BUFFER_ALIGN: usize = 64;
/// Size of one table entry (offset, len).
pub const ENTRY_SIZE: usize = 16;

/// Per-buffer entries of a frame, inline up to four buffers (no allocation per frame).
pub type PerBuffer<T> = smallvec::SmallVec<[T; 4]>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the meta bytes (right after the table).
    pub meta_offset: usize,
    /// Offset of every buffer.
    pub buffer_offsets: PerBuffer<usize>,
    /// Total payload size in bytes.
    pub total: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// The payload is shorter than the table and meta it announces.
    Truncated { needed: usize, available: usize },
    /// A table entry points outside the payload or overlaps the table/meta.
    BadEntry { index: usize, offset: u64, len: u64, payload: usize },
    /// Sizes overflow `usize`.
    Overflow,
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LayoutError::Truncated { needed, available } => write!(
                f,
                "frame payload truncated: header announces {needed} bytes of table and meta, payload has {available}"
            ),
            LayoutError::BadEntry { index, offset, len, payload } => write!(
                f,
                "frame buffer table entry {index} (offset {offset}, len {len}) lies outside the {payload}-byte payload"
            ),
            LayoutError::Overflow => write!(f, "frame sizes overflow the address space"),
        }
    }
}

#[inline]
pub fn align_up(value: usize, align: usize) -> Option<usize> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Computes where the meta bytes and each buffer go for a frame to send.
pub fn compute(meta_len: usize, buffer_lens: &[usize]) -> Result<Layout, LayoutError> {
    let table = buffer_lens.len().checked_mul(ENTRY_SIZE).ok_or(LayoutError::Overflow)?;
    let meta_offset = table;
    let mut cursor = meta_offset.checked_add(meta_len).ok_or(LayoutError::Overflow)?;
    let mut buffer_offsets = PerBuffer::with_capacity(buffer_lens.len());
    for &len in buffer_lens {
        let start = align_up(cursor, BUFFER_ALIGN).ok_or(LayoutError::Overflow)?;
        buffer_offsets.push(start);
        cursor = start.checked_add(len).ok_or(LayoutError::Overflow)?;
    }
    Ok(Layout { meta_offset, buffer_offsets, total: cursor })
}

/// Writes the table for `layout` into the first bytes of `dst`.
///
/// # Safety
/// `dst` must be valid for writes of `buffer_lens.len() * ENTRY_SIZE` bytes.
pub unsafe fn write_table(dst: *mut u8, layout: &Layout, buffer_lens: &[usize]) {
    for (i, (&off, &len)) in layout.buffer_offsets.iter().zip(buffer_lens).enumerate() {
        let mut entry = [0u8; ENTRY_SIZE];
        entry[..8].copy_from_slice(&(off as u64).to_le_bytes());
        entry[8..].copy_from_slice(&(len as u64).to_le_bytes());
        unsafe { core::ptr::copy_nonoverlapping(entry.as_ptr(), dst.add(i * ENTRY_SIZE), ENTRY_SIZE) };
    }
}

/// Parsed view of a received payload: the meta range and the buffer ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub meta: (usize, usize),
    pub buffers: PerBuffer<(usize, usize)>,
}

/// Validates and parses the table of a received payload, so that Python never slices outside
/// the sample even when a peer wrote garbage.
pub fn parse(payload: &[u8], meta_len: usize, nbufs: usize) -> Result<Parsed, LayoutError> {
    let table = nbufs.checked_mul(ENTRY_SIZE).ok_or(LayoutError::Overflow)?;
    let meta_end = table.checked_add(meta_len).ok_or(LayoutError::Overflow)?;
    if meta_end > payload.len() {
        return Err(LayoutError::Truncated { needed: meta_end, available: payload.len() });
    }
    let mut buffers = PerBuffer::with_capacity(nbufs);
    for index in 0..nbufs {
        let e = &payload[index * ENTRY_SIZE..(index + 1) * ENTRY_SIZE];
        let offset = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
        let bad = LayoutError::BadEntry { index, offset, len, payload: payload.len() };
        let end = offset.checked_add(len).ok_or_else(|| bad.clone())?;
        if (offset as usize) < meta_end || end > payload.len() as u64 {
            return Err(bad);
        }
        buffers.push((offset as usize, len as usize));
    }
    Ok(Parsed { meta: (table, meta_end), buffers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(meta: &[u8], bufs: &[&[u8]]) -> Vec<u8> {
        let lens: Vec<usize> = bufs.iter().map(|b| b.len()).collect();
        let layout = compute(meta.len(), &lens).unwrap();
        let mut out = vec![0u8; layout.total];
        unsafe { write_table(out.as_mut_ptr(), &layout, &lens) };
        out[layout.meta_offset..layout.meta_offset + meta.len()].copy_from_slice(meta);
        for (b, &o) in bufs.iter().zip(&layout.buffer_offsets) {
            out[o..o + b.len()].copy_from_slice(b);
        }
        out
    }

    #[test]
    fn roundtrip_and_alignment() {
        let a = vec![7u8; 1000];
        let b = vec![9u8; 3];
        let payload = build(b"meta!", &[&a, &b, &[]]);
        let parsed = parse(&payload, 5, 3).unwrap();
        assert_eq!(&payload[parsed.meta.0..parsed.meta.1], b"meta!");
        for (i, want) in [&a[..], &b[..], &[][..]].iter().enumerate() {
            let (o, l) = parsed.buffers[i];
            assert_eq!(o % BUFFER_ALIGN, 0, "buffer {i} misaligned");
            assert_eq!(&payload[o..o + l], *want);
        }
    }

    #[test]
    fn no_buffers_is_just_meta() {
        let layout = compute(10, &[]).unwrap();
        assert_eq!(layout, Layout { meta_offset: 0, buffer_offsets: PerBuffer::new(), total: 10 });
        let payload = build(b"0123456789", &[]);
        assert_eq!(parse(&payload, 10, 0).unwrap().meta, (0, 10));
    }

    #[test]
    fn rejects_truncated_and_out_of_bounds() {
        let payload = build(b"abc", &[b"xyz"]);
        assert!(matches!(parse(&payload[..10], 3, 1), Err(LayoutError::Truncated { .. })));
        let mut bad = payload.clone();
        bad[8..16].copy_from_slice(&(u64::MAX).to_le_bytes());
        assert!(matches!(parse(&bad, 3, 1), Err(LayoutError::BadEntry { .. })));
        let mut overlap = payload.clone();
        overlap[..8].copy_from_slice(&0u64.to_le_bytes());
        assert!(matches!(parse(&overlap, 3, 1), Err(LayoutError::BadEntry { .. })));
    }
}
