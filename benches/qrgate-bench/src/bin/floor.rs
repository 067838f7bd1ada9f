//! The floor: the least an actix-web server can do for a poll (a fixed 400
//! body), with qrgate's worker count. qrgate's poll numbers are judged
//! against it, measured in the same run on the same machine.

use actix_web::{web, App, HttpResponse, HttpServer};

const BODY: &str = r#"{"error":{"type":"unavailable","message":"no pending sale on this pump"}}"#;

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    // The driver reads the port from the first line.
    println!("{}", listener.local_addr()?.port());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    HttpServer::new(|| {
        App::new().route(
            "/mp/pos/{id}",
            web::get().to(|| async {
                HttpResponse::BadRequest()
                    .content_type("application/json")
                    .body(BODY)
            }),
        )
    })
    .workers(workers)
    .listen(listener)?
    .run()
    .await
}
