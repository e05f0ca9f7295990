//! A gRPC codec that decodes requests with prost and sends responses that
//! are already encoded (see `resource`), copying their bytes into the frame.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes};
use tonic::{
    Status,
    codec::{Codec, EncodeBuf, Encoder},
};
use tonic_prost::ProstDecoder;

pub struct PreEncodedCodec<D>(PhantomData<D>);

impl<D> Default for PreEncodedCodec<D> {
    fn default() -> Self {
        PreEncodedCodec(PhantomData)
    }
}

pub struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl<D> Codec for PreEncodedCodec<D>
where
    D: prost::Message + Default + Send + 'static,
{
    type Encode = Bytes;
    type Decode = D;
    type Encoder = BytesEncoder;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}
