//! A bot: `chatproto::Client` over a plain `TcpStream`. It logs in, then
//! answers every direct message: `time` with the server's clock, `help`
//! with what it knows, anything else with an echo.
//!
//! ```sh
//! CHATBOT_PASSWORD=builder cargo run -p chatproto --example bot -- 127.0.0.1:4000 bob
//! ```
//!
//! The client is sans-IO like the server core: feed it what the socket
//! read, write what it wants sent, act on its events.

use std::io::{Read, Write};
use std::net::TcpStream;

use chatproto::{Client, ClientEvent, Command, MessageFrame};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(user)) = (args.next(), args.next()) else {
        return Err("usage: bot ADDR USER (password in CHATBOT_PASSWORD)".into());
    };
    let password = std::env::var("CHATBOT_PASSWORD")
        .map_err(|_| "set CHATBOT_PASSWORD to the bot's password")?;
    let mut stream = TcpStream::connect(&addr)?;
    let mut client = Client::new();
    let mut buf = [0; 16 * 1024];
    loop {
        while let Some(frame) = client.poll_transmit() {
            stream.write_all(&frame)?;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            println!("the server hung up");
            return Ok(());
        }
        client.handle_input(&buf[..n]);
        while let Some(event) = client.poll_event() {
            match event {
                ClientEvent::Connected { .. } => {
                    let login = format!("login {user} {password}");
                    client.send(Command::parse(&login)?)?;
                }
                ClientEvent::Ok { frame, .. } => println!("ok: {}", frame.text),
                ClientEvent::Error { frame, .. } => println!("error: {}", frame.text),
                ClientEvent::Message(message) => {
                    let reply = answer(&message);
                    client.send(Command::Message {
                        to: message.from,
                        text: reply.parse()?,
                    })?;
                }
                ClientEvent::Closed { reason } => {
                    println!("bye: {reason}");
                    return Ok(());
                }
                _ => {}
            }
        }
    }
}

/// What the bot says back to `message`.
fn answer(message: &MessageFrame) -> String {
    match message.text.as_str().trim() {
        "help" => "I answer 'time', 'help', and echo anything else".to_owned(),
        "time" => format!(
            "the server sent your message at {} ms",
            message.sent_at.as_unix_millis()
        ),
        text => format!("you said: {text}"),
    }
}
