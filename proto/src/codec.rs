//! The prost codec of every generated client and server, with small initial buffers: tonic's
//! default allocates 8 KiB to encode and 8 KiB to decode per stream, up front, which is most
//! of what an idle long-lived stream costs. Buffers still grow for large messages.
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

fn settings() -> BufferSettings {
    BufferSettings::new(512, 32 * 1024)
}

/// ProstCodec with 512-byte initial buffers.
#[derive(Debug)]
pub struct CompactCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
