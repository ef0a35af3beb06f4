//! Wire formats for tollgate. Nothing here does I/O: the server crate feeds bytes in and
//! gets facts out (which model, is it a stream, how many tokens did the provider bill).

pub mod error;
pub mod peek;
pub mod sse;
pub mod translate;
pub mod usage;

pub use peek::{PeekError, RequestDoc};
pub use sse::{
    ChatStreamObserver, MessagesStreamObserver, ResponsesStreamObserver, SseEvent, SseSplitter,
};
pub use usage::Usage;
