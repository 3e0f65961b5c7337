//! PyTorch zip archives: the zip structure, `data.pkl` through the non-executing pickle
//! reader, and every storage reference. Any bytes must give Ok or Err, never a panic.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use memwise_model::parse_torch_zip;

fuzz_target!(|data: &[u8]| {
    let _ = parse_torch_zip(Path::new("fuzz.bin"), Cursor::new(data));
});
