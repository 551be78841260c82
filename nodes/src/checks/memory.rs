//! (being written)

use runner::{Diagnostics, Pipeline};

pub fn check(_p: &Pipeline) -> Diagnostics {
    Diagnostics::default()
}
