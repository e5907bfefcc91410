//! Latency Monkey's relay: a TCP relay on a loopback port that holds every new connection for
//! a delay (plus or minus a jitter) before connecting it to the instance, and stops accepting
//! at a set time. The balancer is pointed at the relay instead of the instance (HAProxy's
//! runtime `set server … addr`), which needs no kernel module (this host has no `netem`).
//! HAProxy opens one server connection per request, so every request is delayed.

use rand::Rng;
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, SystemTime};

/// How long a connection is held before it is relayed.
#[derive(Clone, Copy, Debug)]
pub struct Delay {
    pub delay: Duration,
    pub jitter: Duration,
}

impl Delay {
    fn draw(&self, rng: &mut impl Rng) -> Duration {
        let jitter = self.jitter.as_millis() as i64;
        let offset = if jitter == 0 { 0 } else { rng.gen_range(-jitter..=jitter) };
        Duration::from_millis((self.delay.as_millis() as i64 + offset).max(0) as u64)
    }
}

/// Relays connections from `listener` to `target`, each after its delay, until `until`; then
/// returns (connections under way finish on their own threads).
pub fn relay(listener: TcpListener, target: SocketAddr, delay: Delay, until: SystemTime) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut rng = rand::thread_rng();
    while SystemTime::now() < until {
        match listener.accept() {
            Ok((client, _)) => {
                let wait = delay.draw(&mut rng);
                std::thread::spawn(move || {
                    std::thread::sleep(wait);
                    let _ = pipe(client, target);
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies both ways between `client` and a new connection to `target` until either side ends.
fn pipe(client: TcpStream, target: SocketAddr) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    let (mut client_read, mut server_write) = (client.try_clone()?, server.try_clone()?);
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_read, &mut server_write);
        let _ = server_write.shutdown(Shutdown::Write);
    });
    let (mut server_read, mut client_write) = (server, client);
    let _ = std::io::copy(&mut server_read, &mut client_write);
    let _ = client_write.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Instant;

    #[test]
    fn the_relay_delays_each_connection_and_stops_at_its_time() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut stream in echo.incoming().flatten() {
                let mut buf = [0u8; 5];
                stream.read_exact(&mut buf).unwrap();
                stream.write_all(&buf).unwrap();
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_address = listener.local_addr().unwrap();
        let until = SystemTime::now() + Duration::from_secs(2);
        let delay = Delay { delay: Duration::from_millis(300), jitter: Duration::from_millis(50) };
        let relaying = std::thread::spawn(move || relay(listener, target, delay, until));
        let started = Instant::now();
        let mut stream = TcpStream::connect(relay_address).unwrap();
        stream.write_all(b"hello").unwrap();
        let mut answer = [0u8; 5];
        stream.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"hello");
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
        relaying.join().unwrap().unwrap();
        assert!(SystemTime::now() >= until, "the relay ends at its time");
    }
}
