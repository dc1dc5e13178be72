//! A device's connection over its life: lost, dropped on purpose, taken
//! offline, closed with a DISCONNECT, and opened again with backoff. With
//! `presence_topic` it says `online` on its status topic after each CONNACK
//! and `offline` before each DISCONNECT (its will says `offline` there too).

use super::*;

impl Device {
    /// The connection broke: what was in flight goes back to the queue.
    pub(super) fn lost(&mut self, why: Lost) {
        self.counters.last_error = Some(why.to_string());
        self.drop_link(false);
    }

    /// Drops the connection without a DISCONNECT, as a device losing power
    /// or network would, and schedules the reconnect.
    pub(super) fn drop_link(&mut self, at_once: bool) {
        let was_up = matches!(self.link, Link::Up(_));
        self.link = Link::Down {
            retry_at: if at_once {
                Instant::now()
            } else {
                Instant::now() + self.backoff
            },
            bypass: at_once,
        };
        if !at_once {
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
        self.requeue();
        if was_up {
            self.counters.reconnects += 1;
            self.env.shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn requeue(&mut self) {
        self.rbuf.clear();
        self.wbuf.clear();
        while let Some(p) = self.inflight.pop_back() {
            self.queued.push_front(p);
        }
    }

    /// Goes offline the way a device that is switched off does: it waits a
    /// moment for what is in flight, then says DISCONNECT.
    pub(super) async fn go_offline(&mut self) {
        self.serve(Some(Instant::now() + Duration::from_secs(2)), true)
            .await;
        self.say_goodbye().await;
        self.link = Link::Offline;
        self.requeue();
    }

    pub(super) async fn say_goodbye(&mut self) {
        let mut bye = BytesMut::new();
        self.status(b"offline", &mut bye);
        codec::disconnect(&mut bye);
        if let Link::Up(stream) = &mut self.link {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                stream.write_all(&self.wbuf).await?;
                stream.write_all(&bye).await?;
                stream.shutdown().await
            })
            .await;
        }
    }

    /// Appends the device's status message `payload` to `buf`, when it says
    /// one. At QoS 0: a QoS 1 one would need a packet id and a PUBACK that
    /// the telemetry's bookkeeping knows nothing of.
    fn status(&self, payload: &[u8], buf: &mut BytesMut) {
        if self.env.cfg.presence_topic {
            let topic = self.env.plan.status_topic(self.index);
            codec::publish(buf, self.env.cfg.protocol, &topic, false, 0, false, payload);
        }
    }

    /// Ends the run for this device: what is still pending has failed, and
    /// its readings may or may not have reached the pipeline.
    pub(super) async fn close(&mut self) {
        self.say_goodbye().await;
        self.leave();
    }

    /// Ends the run for this device without a DISCONNECT: the socket just
    /// closes, as when a device loses power, and the broker sends its will
    /// if it left one. What is still pending has failed.
    pub(super) fn leave(&mut self) {
        self.link = Link::Offline;
        let now = Instant::now();
        let pending: Vec<Pending> = self
            .inflight
            .drain(..)
            .chain(self.queued.drain(..))
            .collect();
        for mut p in pending {
            // Its reading may have landed all the same: polled until the
            // timeout, and a miss if it never shows.
            self.offer_sample(p.sample.take());
            self.counters.failed += 1;
            self.env.shared.failed.fetch_add(1, Ordering::Relaxed);
            if p.first_write_ms == 0 {
                // Never written: it ran at least this far behind.
                let lag_us = self.lag_us(p.send.due_us, now);
                self.note_lag(lag_us);
            }
            if let SendKind::Telemetry(m) = &p.send.kind {
                for r in &m.readings {
                    self.exceptions
                        .too_late
                        .insert((self.index, r.seq), Class::Maybe);
                }
            }
        }
    }

    /// One connection attempt; on failure the next is scheduled.
    pub(super) async fn reconnect(&mut self) {
        let attempt = tokio::time::timeout(CONNECT_ATTEMPT, Box::pin(self.open())).await;
        match attempt {
            Ok(Ok((stream, receive_max))) => {
                self.link = Link::Up(stream);
                self.backoff = MIN_BACKOFF;
                self.inflight_cap = self
                    .env
                    .cfg
                    .max_inflight
                    .min(receive_max.map_or(usize::MAX, usize::from))
                    .max(1);
                self.ping_at = Instant::now() + self.env.cfg.keep_alive / 2;
                // Ahead of the queued sends, which the flush encodes after it.
                let mut online = std::mem::take(&mut self.wbuf);
                self.status(b"online", &mut online);
                self.wbuf = online;
                if let Some(tx) = self.announced.take() {
                    let _ = tx.send(self.index);
                    self.env.shared.connected.fetch_add(1, Ordering::Relaxed);
                }
                self.flush().await;
            }
            Ok(Err(e)) => {
                self.counters.last_error = Some(e);
                self.schedule_retry();
            }
            Err(_) => {
                self.counters.last_error = Some(format!(
                    "connecting took longer than {} s",
                    CONNECT_ATTEMPT.as_secs()
                ));
                self.schedule_retry();
            }
        }
    }

    pub(super) fn schedule_retry(&mut self) {
        self.link = Link::Down {
            retry_at: Instant::now() + self.backoff,
            bypass: false,
        };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Opens a connection and completes the MQTT handshake. Returns the
    /// broker's Receive Maximum, if it gave one.
    pub(super) async fn open(&mut self) -> Result<(Stream, Option<u16>), String> {
        let env = self.env.clone();
        let tls = match (&env.tls, &env.server_name) {
            (Some(setup), Some(name)) => Some((
                setup
                    .config_for(&self.device_id)
                    .map_err(|e| e.to_string())?,
                name.clone(),
            )),
            _ => None,
        };
        let source = match env.source.len() {
            0 => None,
            n => env.source.get(self.index as usize % n).copied(),
        };
        let broker = env.broker_of(self.index);
        let mut stream = transport::open(broker, source, tls)
            .await
            .map_err(|e| format!("connecting to {broker}: {e}"))?;
        let mut out = BytesMut::new();
        let expand =
            |s: &Option<String>| s.as_ref().map(|v| v.replace("{device}", &self.device_id));
        let (user, pass) = (expand(&env.cfg.username), expand(&env.cfg.password));
        let will_topic = (self.role == Role::Wills).then(|| env.plan.status_topic(self.index));
        codec::connect_with_will(
            &mut out,
            env.cfg.protocol,
            &self.device_id,
            env.cfg.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
            Login {
                username: user.as_deref(),
                password: pass.as_deref(),
            },
            will_topic.as_deref().map(|topic| codec::Will {
                topic,
                payload: b"offline",
            }),
        );
        stream
            .write_all(&out)
            .await
            .map_err(|e| format!("writing CONNECT: {e}"))?;
        self.rbuf.clear();
        loop {
            match codec::decode(env.cfg.protocol, &mut self.rbuf).map_err(|e| e.to_string())? {
                Some(Incoming::ConnAck {
                    accepted: true,
                    receive_max,
                    ..
                }) => return Ok((stream, receive_max)),
                Some(Incoming::ConnAck { reason, .. }) => {
                    return Err(format!("the broker refused the connection: {reason}"));
                }
                Some(other) => return Err(format!("expected CONNACK, got {other:?}")),
                None => {}
            }
            let n = stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| format!("reading CONNACK: {e}"))?;
            if n == 0 {
                return Err("the broker closed the connection before CONNACK".into());
            }
        }
    }
}
