//! Answers every request with `Hello, world!`: the same bytes the
//! benchmark's native handler returns, so the two measure the platform only.

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

const BODY: &[u8] = b"Hello, world!\n";

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let headers = Fields::from_list(&[("content-type".to_owned(), b"text/plain".to_vec())])
            .unwrap_or_else(|_| Fields::new());
        let response = OutgoingResponse::new(headers);
        let Ok(body) = response.body() else { return };
        ResponseOutparam::set(out, Ok(response));
        if let Ok(stream) = body.write() {
            if cfg!(feature = "cut-body") {
                let _ = stream.blocking_write_and_flush(&BODY[..5]);
                panic!("cut short halfway through the body");
            }
            let _ = stream.blocking_write_and_flush(BODY);
        }
        if cfg!(feature = "unfinished-body") {
            // Returns holding the body, never finished nor dropped.
            std::mem::forget(body);
            return;
        }
        let _ = OutgoingBody::finish(body, None);
    }
}

wasip2::http::proxy::export!(Hello);
