//! Chunked transfer coding (RFC 9112 section 7.1): the incremental decoder over a read
//! buffer, with its limits on chunk lines and trailers.

use bytes::{Buf, Bytes, BytesMut};

use super::{MAX_CHUNK_LINE, MAX_TRAILERS, ProtocolError};

/// What the chunked decoder found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The buffer ends mid-way: read more.
    NeedMore,
    /// The last chunk and the trailers were read; the connection is at the next message.
    Done,
}

/// Decodes `Transfer-Encoding: chunked` incrementally; trailers are read and dropped.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: Chunk,
    /// Bytes of the current size line or of the trailer section, for the limits.
    seen: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size {
        value: u64,
        digits: u8,
    },
    Extension {
        value: u64,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (`empty`) or inside one.
    Trailer {
        empty: bool,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: Chunk::Size {
                value: 0,
                digits: 0,
            },
            seen: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        loop {
            if let Chunk::Data(remaining) = self.state {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = remaining.min(buf.len() as u64) as usize;
                let data = buf.split_to(n).freeze();
                let left = remaining - n as u64;
                self.state = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                };
                return Ok(Decoded::Data(data));
            }
            if self.state == Chunk::Done {
                return Ok(Decoded::Done);
            }
            let Some(&b) = buf.first() else {
                return Ok(Decoded::NeedMore);
            };
            buf.advance(1);
            self.seen += 1;
            self.state = match self.state {
                Chunk::Size { value, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits >= 15 {
                            return Err(ProtocolError::Chunk);
                        }
                        let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                        Chunk::Size {
                            value: value * 16 + digit,
                            digits: digits + 1,
                        }
                    }
                    b';' | b' ' | b'\t' if digits > 0 => Chunk::Extension { value },
                    b'\r' if digits > 0 => Chunk::SizeLf { value },
                    _ => return Err(ProtocolError::Chunk),
                },
                Chunk::Extension { value } => match b {
                    b'\r' => Chunk::SizeLf { value },
                    b'\n' => return Err(ProtocolError::Chunk),
                    _ if self.seen > MAX_CHUNK_LINE => return Err(ProtocolError::Chunk),
                    _ => Chunk::Extension { value },
                },
                Chunk::SizeLf { value } => match b {
                    b'\n' => {
                        self.seen = 0;
                        if value == 0 {
                            Chunk::Trailer { empty: true }
                        } else {
                            Chunk::Data(value)
                        }
                    }
                    _ => return Err(ProtocolError::Chunk),
                },
                Chunk::DataCr => match b {
                    b'\r' => Chunk::DataLf,
                    _ => return Err(ProtocolError::Chunk),
                },
                Chunk::DataLf => match b {
                    b'\n' => {
                        self.seen = 0;
                        Chunk::Size {
                            value: 0,
                            digits: 0,
                        }
                    }
                    _ => return Err(ProtocolError::Chunk),
                },
                Chunk::Trailer { empty } => match b {
                    b'\r' => Chunk::TrailerLf { empty },
                    b'\n' => return Err(ProtocolError::Chunk),
                    _ if self.seen > MAX_TRAILERS => return Err(ProtocolError::Chunk),
                    _ => Chunk::Trailer { empty: false },
                },
                Chunk::TrailerLf { empty } => match b {
                    b'\n' if empty => Chunk::Done,
                    b'\n' => Chunk::Trailer { empty: true },
                    _ => return Err(ProtocolError::Chunk),
                },
                Chunk::Data(_) | Chunk::Done => unreachable!("handled above"),
            };
        }
    }
}
