//! The protobuf codec with small I/O buffers.
//!
//! tonic's default gives every stream an 8 KiB encode and an 8 KiB decode buffer for its
//! whole life. A gateway holds one long-lived, mostly idle Sync stream per device, so those
//! buffers dominated its memory per device; messages here are small, and the buffers still
//! grow on demand for large ones.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial buffer per stream direction.
const BUFFER: usize = 512;
/// Bytes encoded before a stream yields to others (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// A [`ProstCodec`] with [`BUFFER`]-byte initial buffers.
#[derive(Debug, Clone, Copy)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        CompactCodec(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }
}
