//! A bounds check of a GGUF file's header before candle reads it. candle trusts the lengths in
//! the header (string and array lengths, tensor shapes and offsets) and allocates what they
//! say, so a hostile or truncated file could make it allocate terabytes. This walk reads the
//! header with every length checked against the bytes left in the file and every size computed
//! with checked arithmetic, and verifies that each tensor's data lies inside the file.

use std::io::{BufReader, Read, Seek};

/// Why a GGUF header was refused.
pub type Refusal = String;

/// Reads values, refusing any length that the rest of the file cannot hold.
struct Walker<R> {
    reader: R,
    position: u64,
    length: u64,
    version: u32,
}

impl<R: Read> Walker<R> {
    fn bytes(&mut self, count: u64) -> Result<Vec<u8>, Refusal> {
        if count > self.length.saturating_sub(self.position) {
            return Err(format!(
                "a length of {count} bytes at offset {} reaches past the end of the file ({} bytes)",
                self.position, self.length
            ));
        }
        let mut buffer = vec![0u8; usize::try_from(count).map_err(|e| e.to_string())?];
        self.reader
            .read_exact(&mut buffer)
            .map_err(|err| format!("truncated at offset {}: {err}", self.position))?;
        self.position += count;
        Ok(buffer)
    }

    fn skip(&mut self, count: u64) -> Result<(), Refusal> {
        if count > self.length.saturating_sub(self.position) {
            return Err(format!(
                "{count} bytes at offset {} reach past the end of the file ({} bytes)",
                self.position, self.length
            ));
        }
        let copied = std::io::copy(&mut (&mut self.reader).take(count), &mut std::io::sink())
            .map_err(|err| err.to_string())?;
        if copied != count {
            return Err(format!("truncated at offset {}", self.position));
        }
        self.position += count;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, Refusal> {
        let bytes = self.bytes(4)?;
        Ok(u32::from_le_bytes(
            bytes.try_into().map_err(|_| "short read".to_string())?,
        ))
    }

    fn u64(&mut self) -> Result<u64, Refusal> {
        let bytes = self.bytes(8)?;
        Ok(u64::from_le_bytes(
            bytes.try_into().map_err(|_| "short read".to_string())?,
        ))
    }

    /// A length or count: u32 in version 1, u64 after.
    fn count(&mut self) -> Result<u64, Refusal> {
        if self.version == 1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    fn string(&mut self) -> Result<Vec<u8>, Refusal> {
        let length = self.count()?;
        self.bytes(length)
    }

    /// Skips one metadata value of `kind`; returns it when it is an unsigned integer.
    fn value(&mut self, kind: u32, depth: usize) -> Result<Option<u64>, Refusal> {
        let fixed = |size: u64| Some(size);
        let size = match kind {
            0 | 1 | 7 => fixed(1),
            2 | 3 => fixed(2),
            4..=6 => fixed(4),
            10..=12 => fixed(8),
            _ => None,
        };
        if let Some(size) = size {
            let bytes = self.bytes(size)?;
            let value = match kind {
                4 => bytes
                    .try_into()
                    .ok()
                    .map(|b| u64::from(u32::from_le_bytes(b))),
                10 => bytes.try_into().ok().map(u64::from_le_bytes),
                _ => None,
            };
            return Ok(value);
        }
        match kind {
            8 => self.string().map(|_| None),
            9 if depth < 4 => {
                let element = self.u32()?;
                let count = self.count()?;
                match element {
                    0 | 1 | 7 => self.skip(count)?,
                    2 | 3 => self.skip(count.checked_mul(2).ok_or("array too large")?)?,
                    4..=6 => self.skip(count.checked_mul(4).ok_or("array too large")?)?,
                    10..=12 => self.skip(count.checked_mul(8).ok_or("array too large")?)?,
                    _ => {
                        for _ in 0..count {
                            self.value(element, depth + 1)?;
                        }
                    }
                }
                Ok(None)
            }
            _ => Err(format!("unknown metadata value type {kind}")),
        }
    }
}

/// `(elements per block, bytes per block)` of a ggml tensor type.
fn block_layout(kind: u32) -> Option<(u64, u64)> {
    Some(match kind {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 36),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        _ => return None,
    })
}

/// Checks the header of a GGUF stream of `length` bytes.
pub fn check_gguf<R: Read + Seek>(reader: R, length: u64) -> Result<(), Refusal> {
    let mut walker = Walker {
        reader: BufReader::new(reader),
        position: 0,
        length,
        version: 3,
    };
    if walker.bytes(4)? != b"GGUF" {
        return Err("not a GGUF file (bad magic)".to_string());
    }
    walker.version = walker.u32()?;
    if !(1..=3).contains(&walker.version) {
        return Err(format!("unsupported GGUF version {}", walker.version));
    }
    let tensors = walker.count()?;
    let entries = walker.count()?;
    let mut alignment = 32u64;
    for _ in 0..entries {
        let key = walker.string()?;
        let kind = walker.u32()?;
        let value = walker.value(kind, 0)?;
        if key == b"general.alignment" {
            alignment = value
                .filter(|a| *a > 0)
                .ok_or("invalid general.alignment")?;
        }
    }
    let mut spans = Vec::new();
    for _ in 0..tensors {
        let name = String::from_utf8_lossy(&walker.string()?).into_owned();
        let dims = walker.u32()?;
        if dims > 8 {
            return Err(format!("tensor {name}: {dims} dimensions"));
        }
        let mut elements = 1u64;
        for _ in 0..dims {
            let dim = walker.count()?;
            elements = elements
                .checked_mul(dim)
                .ok_or_else(|| format!("tensor {name}: the shape's element count overflows"))?;
        }
        let kind = walker.u32()?;
        let offset = walker.u64()?;
        let (block, bytes) =
            block_layout(kind).ok_or_else(|| format!("tensor {name}: unknown type {kind}"))?;
        if !elements.is_multiple_of(block) {
            return Err(format!(
                "tensor {name}: {elements} elements do not fill whole blocks"
            ));
        }
        let size = (elements / block)
            .checked_mul(bytes)
            .ok_or_else(|| format!("tensor {name}: its size overflows"))?;
        spans.push((name, offset, size));
    }
    let data = walker
        .position
        .div_ceil(alignment)
        .saturating_mul(alignment);
    for (name, offset, size) in spans {
        let end = data
            .checked_add(offset)
            .and_then(|start| start.checked_add(size));
        if end.is_none_or(|end| end > length) {
            return Err(format!(
                "tensor {name}: its data (offset {offset}, {size} bytes) reaches past the end of the file ({length} bytes)"
            ));
        }
    }
    Ok(())
}
