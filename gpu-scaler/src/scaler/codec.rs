//! The protobuf codec of the generated gRPC code (set in build.rs): prost with
//! small per-RPC buffers.
//!
//! tonic's default codec allocates an 8 KiB encode buffer per response stream
//! and keeps it while the stream is open. KEDA holds one StreamIsActive open per
//! `external-push` ScaledObject, and this scaler's messages are tens of bytes, so
//! 10,000 streams cost ~80 MiB of idle buffers with the default and ~2.5 MiB
//! with 256 bytes (buffers still grow on demand). Figures: `cargo xtask bench
//! scaler`.

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial buffer per RPC; grows when a message needs more.
const BUFFER: usize = 256;
/// tonic's default: yield to the runtime after this many encoded bytes.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with [`BUFFER`]-sized buffers.
#[derive(Debug, Clone, Default)]
pub struct SmallCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for SmallCodec<T, U>
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
