//! The vision graph: pixels in, one embedding row per image token out.

use ort::session::Session;
use ort::value::{PrimitiveTensorElementType, TensorRef};

use crate::error::{error_chain, Error, Result};
use crate::kv::KvElement;
use crate::model::image::dynamic::DynamicPixels;
use crate::model::manifest::Manifest;

pub struct Vision {
    session: Session,
    /// `[1, 3, height, width]` of `pixel_values`.
    shape: [usize; 4],
    /// Values of `image_embeds`: image tokens x hidden.
    embeds_len: usize,
    hidden: usize,
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
            hidden: manifest.hidden,
        })
    }

    /// Runs the graph over preprocessed `pixels` (`[1, 3, height, width]`)
    /// and returns the image's embedding rows.
    pub(crate) fn encode<E: KvElement + PrimitiveTensorElementType + Copy>(
        &mut self,
        pixels: &[f32],
        model_name: &str,
    ) -> Result<Vec<E>> {
        // One picture is one frame of the tiles' run.
        self.encode_tiles(pixels, 1, model_name)
    }

    /// Runs the graph of a dynamic-resolution model over one picture's
    /// inputs ([`DynamicPixels`]) and returns its embedding rows, one per
    /// image token of its grid.
    pub(crate) fn encode_dynamic<E: KvElement + PrimitiveTensorElementType + Copy>(
        &mut self,
        feed: &DynamicPixels,
        model_name: &str,
    ) -> Result<Vec<E>> {
        let fail = |what: &str, err: &ort::Error| Error::Runtime {
            context: format!("running {what}"),
            reason: crate::model::decoder::one_line(&error_chain(err)),
        };
        let Some(grid) = feed.grid else {
            return Err(Error::Shape("no picture was loaded for the vision graph".into()));
        };
        let (patches, tokens) = (grid.patches(), grid.tokens());
        let patch_len = feed.pixels.len() / patches.max(1);
        let pixels = TensorRef::from_array_view(([patches, patch_len], feed.pixels.as_slice()))
            .map_err(|e| fail("pixel_values", &e))?;
        let positions = TensorRef::from_array_view(([patches, 2], feed.patch_positions.as_slice()))
            .map_err(|e| fail("patch_positions", &e))?;
        let index = TensorRef::from_array_view(([tokens], feed.window_index.as_slice()))
            .map_err(|e| fail("window_index", &e))?;
        let reverse = TensorRef::from_array_view(([tokens], feed.window_reverse.as_slice()))
            .map_err(|e| fail("window_reverse", &e))?;
        let windows =
            TensorRef::from_array_view(([patches], feed.window_ids.as_slice())).map_err(|e| fail("window_ids", &e))?;
        let outputs = self
            .session
            .run(ort::inputs![
                "pixel_values" => pixels,
                "patch_positions" => positions,
                "window_index" => index,
                "window_reverse" => reverse,
                "window_ids" => windows,
            ])
            .map_err(|e| fail("the vision graph", &e))?;
        let (_, embeds) = outputs["image_embeds"]
            .try_extract_tensor::<E>()
            .map_err(|e| fail("image_embeds", &e))?;
        check_len(
            embeds.len(),
            tokens * self.hidden,
            "the grid's tokens x hidden",
            model_name,
        )?;
        Ok(embeds.to_vec())
    }
}

/// The graph gave as many values as its manifest promised; otherwise the
/// model's fault, not the picture's.
fn check_len(got: usize, expected: usize, what: &str, model_name: &str) -> Result<()> {
    if got == expected {
        return Ok(());
    }
    Err(Error::ModelFile {
        path: "vision.onnx".into(),
        reason: format!(
            "model {model_name}: the vision graph gave {got} values, but {what} = {expected}: the graph does not \
             match its manifest; rebuild the model"
        ),
    })
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
        check_len(
            embeds.len(),
            frames * self.embeds_len,
            "tiles x vision.image_tokens x hidden",
            model_name,
        )?;
        Ok(embeds.to_vec())
    }
}
