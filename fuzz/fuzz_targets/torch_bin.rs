//! PyTorch zip archives: the zip structure, `data.pkl` through the non-executing pickle
//! reader, and every storage reference. Any bytes must give Ok or Err, never a panic.
//!
//! Half the inputs are taken as whole archives. The other half become `data.pkl` of a
//! valid archive that also holds a few storages: mutating a whole archive almost always
//! breaks the CRC of `data.pkl`, so without this the pickle reader would rarely be reached.
#![no_main]

use std::io::{Cursor, Write};
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use memwise_model::checkpoint::parse_torch_zip;
use zip::write::SimpleFileOptions;

fn archive_around(pickle: &[u8]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let entries: [(&str, &[u8]); 5] = [
        ("archive/data.pkl", pickle),
        ("archive/byteorder", b"little"),
        ("archive/data/0", &[7u8; 64]),
        ("archive/data/1", &[1u8; 4096]),
        ("archive/data/2", &[]),
    ];
    for (name, bytes) in entries {
        if zip.start_file(name, stored).is_err() || zip.write_all(bytes).is_err() {
            return Vec::new();
        }
    }
    zip.finish().map(Cursor::into_inner).unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.bin");
    match data.split_first() {
        Some((selector, pickle)) if selector % 2 == 1 => {
            let _ = parse_torch_zip(path, Cursor::new(archive_around(pickle)));
        }
        _ => {
            let _ = parse_torch_zip(path, Cursor::new(data));
        }
    }
});
