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

/// `Fleet.UploadTelemetry`'s gRPC path, for the pre-encoded client and the zero-copy server.
pub const UPLOAD_TELEMETRY_PATH: &str = "/edgewise.v1.Fleet/UploadTelemetry";

/// A codec whose requests are already-encoded protobuf messages (`Bytes`) and whose
/// responses are decoded as `U`.
///
/// The agent's telemetry buffer keeps events as encoded protobuf records; an upload
/// concatenates them into a `TelemetryBatch` body instead of decoding and re-encoding every
/// event. The server sees an ordinary message.
#[derive(Debug, Clone, Copy)]
pub struct PreEncodedCodec<U>(PhantomData<U>);

impl<U> Default for PreEncodedCodec<U> {
    fn default() -> Self {
        PreEncodedCodec(PhantomData)
    }
}

/// Writes pre-encoded message bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreEncodedEncoder;

impl tonic::codec::Encoder for PreEncodedEncoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Self::Item,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER, YIELD_THRESHOLD)
    }
}

impl<U> Codec for PreEncodedCodec<U>
where
    U: prost::Message + Default + Send + 'static,
{
    type Encode = bytes::Bytes;
    type Decode = U;
    type Encoder = PreEncodedEncoder;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<U, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }
}

/// A server codec that hands over each request as its encoded bytes (a zero-copy slice of
/// the receive buffer) and encodes responses `T` with prost. The gateway decodes telemetry
/// uploads itself, as [`crate::view`] messages.
#[derive(Debug, Clone, Copy)]
pub struct RawRequestCodec<T>(PhantomData<T>);

impl<T> Default for RawRequestCodec<T> {
    fn default() -> Self {
        RawRequestCodec(PhantomData)
    }
}

/// Yields a message's bytes undecoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl tonic::codec::Decoder for RawDecoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Self::Error> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len)))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER, YIELD_THRESHOLD)
    }
}

impl<T> Codec for RawRequestCodec<T>
where
    T: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = bytes::Bytes;
    type Encoder = ProstEncoder<T>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, T>::raw_encoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}
