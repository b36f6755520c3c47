//! The vision graph: pixels in, one embedding row per image token out.

use ort::session::Session;
use ort::value::{PrimitiveTensorElementType, TensorRef};

use crate::error::{error_chain, Error, Result};
use crate::kv::KvElement;
use crate::model::manifest::Manifest;

pub struct Vision {
    session: Session,
    /// `[1, 3, height, width]` of `pixel_values`.
    shape: [usize; 4],
    /// Values of `image_embeds`: image tokens x hidden.
    embeds_len: usize,
}

impl std::fmt::Debug for Vision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vision").field("shape", &self.shape).finish()
    }
}

impl Vision {
    pub(crate) fn new(session: Session, manifest: &Manifest) -> Option<Self> {
        let spec = manifest.vision.as_ref()?;
        Some(Vision {
            session,
            shape: [1, 3, spec.preprocess.height as usize, spec.preprocess.width as usize],
            embeds_len: spec.image_tokens * manifest.hidden,
        })
    }

    /// Runs the graph over preprocessed `pixels` (`[1, 3, height, width]`)
    /// and returns the image's embedding rows.
    pub(crate) fn encode<E: KvElement + PrimitiveTensorElementType + Copy>(
        &mut self,
        pixels: &[f32],
        model_name: &str,
    ) -> Result<Vec<E>> {
        let fail = |what: &str, err: &ort::Error| Error::Runtime {
            context: format!("running {what}"),
            reason: crate::model::decoder::one_line(&error_chain(err)),
        };
        let input = TensorRef::from_array_view((self.shape, pixels)).map_err(|e| fail("pixel_values", &e))?;
        let outputs = self
            .session
            .run(ort::inputs!["pixel_values" => input])
            .map_err(|e| fail("the vision graph", &e))?;
        let (_, embeds) = outputs["image_embeds"]
            .try_extract_tensor::<E>()
            .map_err(|e| fail("image_embeds", &e))?;
        if embeds.len() != self.embeds_len {
            // The model's fault, not the picture's.
            return Err(Error::ModelFile {
                path: "vision.onnx".into(),
                reason: format!(
                    "model {model_name}: the vision graph gave {} values, but its manifest says \
                     vision.image_tokens x hidden = {}: the graph does not match its manifest; rebuild the model",
                    embeds.len(),
                    self.embeds_len
                ),
            });
        }
        Ok(embeds.to_vec())
    }
}

// ---- split pictures (Idefics3 / SmolVLM) ----------------------------------

impl Vision {
    /// Runs the graph once over `frames` preprocessed tiles
    /// (`[frames, 3, height, width]`, a split picture's tiles then its
    /// global image) and returns their embedding rows in that order.
    pub(crate) fn encode_tiles<E: KvElement + PrimitiveTensorElementType + Copy>(
        &mut self,
        pixels: &[f32],
        frames: usize,
        model_name: &str,
    ) -> Result<Vec<E>> {
        let [_, channels, height, width] = self.shape;
        let shape = [frames, channels, height, width];
        if frames == 0 || pixels.len() != shape.iter().product::<usize>() {
            return Err(Error::Shape(format!(
                "{} pixel values for {frames} tiles of {channels}x{height}x{width}",
                pixels.len()
            )));
        }
        let fail = |what: &str, err: &ort::Error| Error::Runtime {
            context: format!("running {what}"),
            reason: crate::model::decoder::one_line(&error_chain(err)),
        };
        let input = TensorRef::from_array_view((shape, pixels)).map_err(|e| fail("pixel_values", &e))?;
        let outputs = self
            .session
            .run(ort::inputs!["pixel_values" => input])
            .map_err(|e| fail("the vision graph", &e))?;
        let (_, embeds) = outputs["image_embeds"]
            .try_extract_tensor::<E>()
            .map_err(|e| fail("image_embeds", &e))?;
        if embeds.len() != frames * self.embeds_len {
            return Err(Error::ModelFile {
                path: "vision.onnx".into(),
                reason: format!(
                    "model {model_name}: the vision graph gave {} values for {frames} tiles, but its manifest \
                     says vision.image_tokens x hidden = {} a tile: the graph does not match its manifest; \
                     rebuild the model",
                    embeds.len(),
                    self.embeds_len
                ),
            });
        }
        Ok(embeds.to_vec())
    }
}
