//! The protobuf codec of the forwarding service (`proto/forward.proto`): prost's, with
//! small starting buffers.
//!
//! tonic's default codec starts every call's encode and decode buffer at 8 KiB, four of
//! them per forwarded call (the sender's encoder and decoder, the owner's). A forwarded
//! PUT is a few hundred bytes, and each 8 KiB block is in glibc's large bins, so every
//! call also paid a `malloc_consolidate` of the small free lists (BENCHMARKS.md "Cluster
//! data path"). Buffers here start at [`START`] bytes and grow as a message needs
//! (tonic reserves a whole message before decoding it; prost reserves as it encodes).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Starting size of a call's encode and decode buffer: a forwarded PUT and its answer fit.
pub const START: usize = 1024;

/// tonic's own default: how many encoded bytes a streaming call buffers before yielding.
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(START, YIELD_THRESHOLD)
}

/// prost encoding with [`START`]-byte buffers (`codec_path` of `build.rs`).
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
