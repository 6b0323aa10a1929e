//! The virtio-mem wire format.
//!
//! Request (24 bytes, little-endian): `type` u16, 3 × u16 padding, `addr` u64, `nb_blocks` u16,
//! 3 × u16 padding. Response (10 bytes): `type` u16, 3 × u16 padding, `state` u16 (only
//! meaningful for an acknowledged STATE request). Padding is ignored, as the spec requires.

/// Length of a request.
pub const REQUEST_SIZE: usize = 24;
/// Length of a response.
pub const RESPONSE_SIZE: usize = 10;

/// Request type PLUG.
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// Request type UNPLUG.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// Request type UNPLUG_ALL.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// Request type STATE.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

/// A parsed guest request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Plug `nb_blocks` blocks from `addr`.
    Plug {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// Unplug `nb_blocks` blocks from `addr`.
    Unplug {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// Unplug every block and shrink the usable region.
    UnplugAll,
    /// Report whether the blocks are plugged, unplugged or mixed.
    State {
        /// Guest-physical address of the first block.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
}

/// A request that cannot be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Fewer than 24 readable bytes.
    #[error("request is {0} bytes, expected {REQUEST_SIZE}")]
    TooShort(usize),
    /// A type the spec does not define.
    #[error("unknown request type {0}")]
    UnknownType(u16),
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(src) = b.get(at..at + 2) {
        v.copy_from_slice(src);
    }
    u16::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(src) = b.get(at..at + 8) {
        v.copy_from_slice(src);
    }
    u64::from_le_bytes(v)
}

impl Request {
    /// Parse the request's bytes. Bytes past the first 24 are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Request, RequestError> {
        if bytes.len() < REQUEST_SIZE {
            return Err(RequestError::TooShort(bytes.len()));
        }
        let addr = le_u64(bytes, 8);
        let nb_blocks = le_u16(bytes, 16);
        match le_u16(bytes, 0) {
            VIRTIO_MEM_REQ_PLUG => Ok(Request::Plug { addr, nb_blocks }),
            VIRTIO_MEM_REQ_UNPLUG => Ok(Request::Unplug { addr, nb_blocks }),
            VIRTIO_MEM_REQ_UNPLUG_ALL => Ok(Request::UnplugAll),
            VIRTIO_MEM_REQ_STATE => Ok(Request::State { addr, nb_blocks }),
            t => Err(RequestError::UnknownType(t)),
        }
    }

    /// Encode, as a driver would (used by tests playing the driver).
    pub fn to_bytes(&self) -> [u8; REQUEST_SIZE] {
        let (ty, addr, nb) = match *self {
            Request::Plug { addr, nb_blocks } => (VIRTIO_MEM_REQ_PLUG, addr, nb_blocks),
            Request::Unplug { addr, nb_blocks } => (VIRTIO_MEM_REQ_UNPLUG, addr, nb_blocks),
            Request::UnplugAll => (VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0),
            Request::State { addr, nb_blocks } => (VIRTIO_MEM_REQ_STATE, addr, nb_blocks),
        };
        let mut b = [0u8; REQUEST_SIZE];
        b[0..2].copy_from_slice(&ty.to_le_bytes());
        b[8..16].copy_from_slice(&addr.to_le_bytes());
        b[16..18].copy_from_slice(&nb.to_le_bytes());
        b
    }
}

/// Response type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ResponseType {
    /// Done.
    Ack = 0,
    /// Refused, e.g. a plug beyond `requested_size`; the driver retries after re-reading config.
    Nack = 1,
    /// Cannot be done now; the driver retries later.
    Busy = 2,
    /// Malformed request; Linux marks the device broken.
    Error = 3,
}

/// State of a range of blocks, answered to STATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum BlockRangeState {
    /// All plugged.
    Plugged = 0,
    /// All unplugged.
    Unplugged = 1,
    /// Some of each.
    Mixed = 2,
}

/// A response to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The answer.
    pub resp_type: ResponseType,
    /// For an acknowledged STATE request.
    pub state: Option<BlockRangeState>,
}

impl Response {
    /// A response without state.
    pub fn of(resp_type: ResponseType) -> Self {
        Response {
            resp_type,
            state: None,
        }
    }

    /// ACK to STATE with `state`.
    pub fn state(state: BlockRangeState) -> Self {
        Response {
            resp_type: ResponseType::Ack,
            state: Some(state),
        }
    }

    /// The 10 bytes the driver reads.
    pub fn to_bytes(&self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0u8; RESPONSE_SIZE];
        b[0..2].copy_from_slice(&(self.resp_type as u16).to_le_bytes());
        if let Some(s) = self.state {
            b[8..10].copy_from_slice(&(s as u16).to_le_bytes());
        }
        b
    }

    /// Decode a response as a driver would (used by tests playing the driver): the state is
    /// only read for an acknowledged STATE request. None if too short or of unknown type.
    pub fn parse(b: &[u8], state_request: bool) -> Option<Response> {
        if b.len() < RESPONSE_SIZE {
            return None;
        }
        let resp_type = match le_u16(b, 0) {
            0 => ResponseType::Ack,
            1 => ResponseType::Nack,
            2 => ResponseType::Busy,
            3 => ResponseType::Error,
            _ => return None,
        };
        if !state_request || resp_type != ResponseType::Ack {
            return Some(Response::of(resp_type));
        }
        let state = match le_u16(b, 8) {
            0 => BlockRangeState::Plugged,
            1 => BlockRangeState::Unplugged,
            2 => BlockRangeState::Mixed,
            _ => return None,
        };
        Some(Response::state(state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_type_ignoring_padding() {
        let mut b = Request::Plug {
            addr: 0x1_2345_6000,
            nb_blocks: 7,
        }
        .to_bytes();
        // Garbage in the padding must not matter.
        b[2..8].fill(0xee);
        b[18..24].fill(0xee);
        assert_eq!(
            Request::parse(&b),
            Ok(Request::Plug {
                addr: 0x1_2345_6000,
                nb_blocks: 7
            })
        );
        for r in [
            Request::Unplug {
                addr: 8,
                nb_blocks: 1,
            },
            Request::UnplugAll,
            Request::State {
                addr: u64::MAX,
                nb_blocks: u16::MAX,
            },
        ] {
            assert_eq!(Request::parse(&r.to_bytes()), Ok(r));
        }
        // Extra bytes are ignored.
        let mut long = Request::UnplugAll.to_bytes().to_vec();
        long.extend([1, 2, 3]);
        assert_eq!(Request::parse(&long), Ok(Request::UnplugAll));
    }

    #[test]
    fn rejects_short_and_unknown() {
        let b = Request::UnplugAll.to_bytes();
        assert_eq!(Request::parse(&b[..23]), Err(RequestError::TooShort(23)));
        assert_eq!(Request::parse(&[]), Err(RequestError::TooShort(0)));
        let mut b = b;
        b[0] = 4;
        assert_eq!(Request::parse(&b), Err(RequestError::UnknownType(4)));
    }

    #[test]
    fn response_layout() {
        let b = Response::state(BlockRangeState::Mixed).to_bytes();
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
        let b = Response::of(ResponseType::Nack).to_bytes();
        assert_eq!(b, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            Response::parse(&Response::of(ResponseType::Error).to_bytes(), true),
            Some(Response::of(ResponseType::Error))
        );
        let st = Response::state(BlockRangeState::Unplugged);
        assert_eq!(Response::parse(&st.to_bytes(), true), Some(st));
        assert_eq!(
            Response::parse(&st.to_bytes(), false),
            Some(Response::of(ResponseType::Ack))
        );
        assert_eq!(Response::parse(&b[..9], false), None);
    }
}
