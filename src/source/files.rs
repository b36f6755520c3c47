//! Image files as a stream: one file, a folder or a glob, ordered by name,
//! optionally looping. The list is read again at the start of every pass,
//! so files added to a folder join the next loop.

use std::path::{Path, PathBuf};

use super::{Frame, FrameSource, SourceOptions, SourceSpec};
use crate::error::{error_chain, Error, Result};
use crate::model::image::decode_file_rgb8;

/// Extensions a folder's files must have to be frames (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "ppm", "pnm", "pgm", "pbm", "bmp", "webp", "tif", "tiff", "gif",
];

/// Frames from image files.
pub struct FileSource {
    spec: String,
    listing: SourceSpec,
    files: Vec<PathBuf>,
    next_index: usize,
    looping: bool,
    max_pixels: u64,
    next_id: u64,
    /// Whether any file of the current pass decoded; a loop over files that
    /// all fail would spin forever.
    decoded_this_pass: bool,
}

impl FileSource {
    /// Lists the files; none is a configuration error. `spec` must be a
    /// file, folder or glob spec.
    pub fn open(spec: &SourceSpec, options: &SourceOptions) -> Result<FileSource> {
        let files = list(spec)?;
        Ok(FileSource {
            spec: spec.to_string(),
            listing: spec.clone(),
            files,
            next_index: 0,
            looping: options.looping,
            max_pixels: options.max_pixels,
            next_id: 0,
            decoded_this_pass: false,
        })
    }

    /// The files of the current pass, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl FrameSource for FileSource {
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        if self.next_index == self.files.len() {
            // Every file corrupt is a failure with or without --loop (it
            // ended with success without it): nothing could be used.
            if !self.decoded_this_pass && self.next_id == 0 {
                return Err(Error::SourceConfig {
                    spec: self.spec.clone(),
                    reason: format!(
                        "none of its {} files could be decoded: no frame to use{}",
                        self.files.len(),
                        if self.looping { "; not looping over them" } else { "" }
                    ),
                });
            }
            if !self.looping {
                return Ok(None);
            }
            if !self.decoded_this_pass {
                return Err(Error::SourceConfig {
                    spec: self.spec.clone(),
                    reason: format!(
                        "none of its {} files could be decoded; not looping over them",
                        self.files.len()
                    ),
                });
            }
            self.files = list(&self.listing)?;
            self.next_index = 0;
            self.decoded_this_pass = false;
        }
        let path = self.files[self.next_index].clone();
        self.next_index += 1;
        match decode_file_rgb8(&path, self.max_pixels) {
            Ok((image, _format)) => {
                self.decoded_this_pass = true;
                let frame = Frame::new(self.next_id, image, Some(path));
                self.next_id += 1;
                Ok(Some(frame))
            }
            Err(err) => Err(Error::FrameCorrupt {
                spec: self.spec.clone(),
                frame: path.display().to_string(),
                reason: error_chain(&err),
            }),
        }
    }

    fn reconnect(&mut self) -> Result<()> {
        // Files are never lost (an unreadable one is a corrupt frame).
        Ok(())
    }

    fn is_live(&self) -> bool {
        false
    }

    fn spec(&self) -> &str {
        &self.spec
    }
}

/// The files a spec names, ordered by path.
fn list(spec: &SourceSpec) -> Result<Vec<PathBuf>> {
    let bad = |reason: String| Error::SourceConfig {
        spec: spec.to_string(),
        reason,
    };
    let mut files = match spec {
        SourceSpec::File(path) => {
            if !path.is_file() {
                return Err(bad(if path.exists() {
                    "not a regular file".into()
                } else {
                    "no such file".into()
                }));
            }
            vec![path.clone()]
        }
        SourceSpec::Dir(dir) => {
            let entries = std::fs::read_dir(dir).map_err(|e| bad(format!("cannot read the folder: {e}")))?;
            let mut files = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| bad(format!("cannot read the folder: {e}")))?;
                let path = entry.path();
                if is_hidden(&path) || !has_image_extension(&path) || !path.is_file() {
                    continue;
                }
                files.push(path);
            }
            if files.is_empty() {
                return Err(bad(format!(
                    "no image files in the folder (extensions: {})",
                    IMAGE_EXTENSIONS.join(", ")
                )));
            }
            files
        }
        SourceSpec::Glob(pattern) => {
            let paths = glob::glob(pattern).map_err(|e| bad(format!("bad glob pattern: {e}")))?;
            let mut files = Vec::new();
            for path in paths {
                // An entry that cannot be read (permissions) is left out, as a shell would.
                match path {
                    Ok(path) if path.is_file() => files.push(path),
                    Ok(_) => {}
                    Err(err) => log::warn!("{spec}: skipping {}: {}", err.path().display(), err.error()),
                }
            }
            if files.is_empty() {
                return Err(bad("no file matches the pattern".into()));
            }
            files
        }
        SourceSpec::Stdin(_) | SourceSpec::Gst(_) => {
            return Err(bad("not a file source".into()));
        }
    };
    files.sort();
    Ok(files)
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|known| known.eq_ignore_ascii_case(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    /// A 4x2 PNG whose first pixel's red channel is `marker`.
    fn write_png(path: &Path, marker: u8) {
        let mut image = RgbImage::from_pixel(4, 2, Rgb([0, 50, 100]));
        image.put_pixel(0, 0, Rgb([marker, 0, 0]));
        image.save(path).unwrap();
    }

    fn markers(source: &mut FileSource, count: usize) -> Vec<(u64, u8)> {
        (0..count)
            .map(|_| {
                let frame = source.next_frame().unwrap().unwrap();
                (frame.id, frame.image.get_pixel(0, 0)[0])
            })
            .collect()
    }

    #[test]
    fn a_folder_is_read_in_name_order_and_other_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for (name, marker) in [("b.png", 2), ("a.png", 1), ("c.PNG", 3)] {
            write_png(&dir.path().join(name), marker);
        }
        std::fs::write(dir.path().join("notes.txt"), "not a frame").unwrap();
        write_png(&dir.path().join(".hidden.png"), 9);
        std::fs::create_dir(dir.path().join("sub.png")).unwrap();

        let spec = SourceSpec::Dir(dir.path().into());
        let mut source = FileSource::open(&spec, &SourceOptions::default()).unwrap();
        assert_eq!(source.files().len(), 3);
        assert_eq!(markers(&mut source, 3), vec![(0, 1), (1, 2), (2, 3)]);
        assert!(source.next_frame().unwrap().is_none());
        assert!(source.next_frame().unwrap().is_none(), "stays ended");
        assert!(!source.is_live());
    }

    #[test]
    fn looping_starts_again_and_keeps_counting_ids() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("f1.png"), 1);
        write_png(&dir.path().join("f2.png"), 2);
        let spec = SourceSpec::Glob(format!("{}/f*.png", dir.path().display()));
        let options = SourceOptions {
            looping: true,
            ..SourceOptions::default()
        };
        let mut source = FileSource::open(&spec, &options).unwrap();
        assert_eq!(markers(&mut source, 4), vec![(0, 1), (1, 2), (2, 1), (3, 2)]);
        // A file added to the folder joins the next pass.
        write_png(&dir.path().join("f3.png"), 3);
        assert_eq!(markers(&mut source, 3), vec![(4, 1), (5, 2), (6, 3)]);
    }

    #[test]
    fn a_corrupt_file_is_one_skippable_error() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("1.png"), 1);
        std::fs::write(dir.path().join("2.jpg"), b"\xff\xd8\xff\xe0 truncated").unwrap();
        write_png(&dir.path().join("3.png"), 3);
        let spec = SourceSpec::Dir(dir.path().into());
        let mut source = FileSource::open(&spec, &SourceOptions::default()).unwrap();
        assert_eq!(source.next_frame().unwrap().unwrap().id, 0);
        let err = source.next_frame().unwrap_err();
        assert_eq!(err.source_failure(), crate::error::SourceFailure::CorruptFrame);
        assert!(err.to_string().contains("2.jpg"), "{err}");
        let third = source.next_frame().unwrap().unwrap();
        assert_eq!((third.id, third.image.get_pixel(0, 0)[0]), (1, 3));
        assert!(source.next_frame().unwrap().is_none());
    }

    #[test]
    fn looping_over_files_that_all_fail_stops() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.png"), b"not a png").unwrap();
        let spec = SourceSpec::Dir(dir.path().into());
        let options = SourceOptions {
            looping: true,
            ..SourceOptions::default()
        };
        let mut source = FileSource::open(&spec, &options).unwrap();
        assert!(matches!(source.next_frame(), Err(Error::FrameCorrupt { .. })));
        let err = source.next_frame().unwrap_err();
        assert!(matches!(err, Error::SourceConfig { .. }), "{err}");
    }

    #[test]
    fn nothing_to_read_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = SourceSpec::Dir(dir.path().into());
        let err = FileSource::open(&empty, &SourceOptions::default()).err().unwrap();
        assert!(err.to_string().contains("no image files"), "{err}");
        let missing = SourceSpec::File(dir.path().join("missing.png"));
        let err = FileSource::open(&missing, &SourceOptions::default()).err().unwrap();
        assert!(err.to_string().contains("no such file"), "{err}");
        let nothing = SourceSpec::Glob(format!("{}/*.jpg", dir.path().display()));
        let err = FileSource::open(&nothing, &SourceOptions::default()).err().unwrap();
        assert!(err.to_string().contains("no file matches"), "{err}");
        let bad = SourceSpec::Glob("frames/[".into());
        let err = FileSource::open(&bad, &SourceOptions::default()).err().unwrap();
        assert!(err.to_string().contains("bad glob pattern"), "{err}");
    }
}
