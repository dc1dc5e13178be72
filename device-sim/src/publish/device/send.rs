//! Writing a device's sends: queueing, encoding PUBLISHes into the write
//! buffer, flushing it, and the freshness samples taken on the way.

use super::*;

impl Device {
    /// Takes send `send` into the device's queue and writes what it can.
    pub(super) fn submit(&mut self, send: Send) {
        self.counters.issued += 1;
        match &send.kind {
            SendKind::Telemetry(m) => {
                self.counters.readings_issued += m.readings.len() as u64;
                self.env.shared.issued.fetch_add(1, Ordering::Relaxed);
            }
            SendKind::Duplicate(_) => self.counters.duplicates_issued += 1,
            SendKind::Malformed { .. } => self.counters.malformed_issued += 1,
        }
        self.queued.push_back(Pending {
            send,
            first_write_ms: 0,
            pkid: 0,
            written_at: None,
            retried: false,
            sample: None,
        });
        self.encode_queued();
        if matches!(self.link, Link::Up(_)) && !self.queued.is_empty() {
            self.counters.window_waits += 1;
        }
        self.flush_now();
    }

    /// Encodes queued sends into the write buffer while the connection is
    /// up and the in-flight window has room.
    pub(super) fn encode_queued(&mut self) {
        if !matches!(self.link, Link::Up(_)) {
            return;
        }
        let now_ms = crate::now_ms();
        let now = Instant::now();
        while self.inflight.len() < self.inflight_cap {
            let Some(mut p) = self.queued.pop_front() else {
                break;
            };
            let again = p.written_at.is_some() || p.first_write_ms != 0;
            if again && !p.retried {
                p.retried = true;
                self.counters.retransmissions += 1;
                self.env
                    .shared
                    .retransmissions
                    .fetch_add(1, Ordering::Relaxed);
                match &p.send.kind {
                    SendKind::Telemetry(m) | SendKind::Duplicate(m) => {
                        self.counters.retransmitted_readings += m.readings.len() as u64
                    }
                    SendKind::Malformed { .. } => self.counters.retransmitted_malformed += 1,
                }
            }
            if !again {
                p.first_write_ms = now_ms;
                let lag_us = self.lag_us(p.send.due_us, now);
                self.note_lag(lag_us);
                if matches!(p.send.kind, SendKind::Telemetry(_)) {
                    self.first_publish.get_or_insert(now);
                }
                p.sample = self.sample(&p, now);
            }
            let payload = match &p.send.kind {
                SendKind::Telemetry(m) | SendKind::Duplicate(m) => self.values.payload(m),
                SendKind::Malformed { k, first_seq } => {
                    malformed(*first_seq + k, p.send.due_us.div_euclid(1000))
                }
            };
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            codec::publish(
                &mut self.wbuf,
                self.env.cfg.protocol,
                &self.topic,
                self.env.qos1(),
                pkid,
                again,
                &payload,
            );
            p.pkid = pkid;
            p.written_at = Some(now);
            // A QoS 0 send waits here only until its bytes leave the write
            // buffer (see `after_write`).
            self.inflight.push_back(p);
        }
    }

    /// Takes every n-th first write of a telemetry message as a freshness
    /// sample, to be offered to the probe with the send's fate.
    pub(super) fn sample(&mut self, p: &Pending, now: Instant) -> Option<Sample> {
        let SendKind::Telemetry(m) = &p.send.kind else {
            return None;
        };
        self.sent_telemetry += 1;
        let newest = m.readings.iter().map(|r| r.ts).max()?;
        // The probe sees a reading by the device's latest ts reaching it,
        // which tells nothing about a reading no newer than one already
        // sent (several messages share a millisecond above 1,000 msgs/s).
        // Such a turn passes to the next message that is newer.
        let advances = newest > self.newest_ts;
        self.newest_ts = self.newest_ts.max(newest);
        let (every, _) = self.env.freshness.as_ref()?;
        if (self.sent_telemetry + self.sample_offset).is_multiple_of((*every).max(1)) {
            self.sample_wanted = true;
        }
        if !self.sample_wanted || !advances {
            return None;
        }
        self.sample_wanted = false;
        Some(Sample {
            device_id: self.device_id.clone(),
            ts: newest,
            written: now,
        })
    }

    /// Hands a sample to the probe once its send is acknowledged (QoS 1),
    /// written out (QoS 0) or given up on. The probe's first poll comes
    /// then, not at the write: a QoS 1 reading is stored before its PUBACK
    /// is sent, so polls before it would mostly find nothing, and at a
    /// fleet's rate they were enough to queue the probe's own requests and
    /// inflate the figure it measures. The figure still runs from the
    /// write (`written`). A full queue counts the sample as dropped, which
    /// the figures count as a miss.
    pub(super) fn offer_sample(&mut self, sample: Option<Sample>) {
        let (Some(sample), Some((_, tx))) = (sample, &self.env.freshness) else {
            return;
        };
        if tx.try_send(sample).is_err() {
            self.env
                .shared
                .freshness_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes the write buffer out without waiting (a synchronous attempt is
    /// enough almost always; the rest goes with the next flush).
    pub(super) fn flush_now(&mut self) {
        if self.wbuf.is_empty() {
            return;
        }
        let Link::Up(stream) = &mut self.link else {
            return;
        };
        let result = match stream {
            Stream::Plain(tcp) => match tcp.try_write(&self.wbuf) {
                Ok(n) => {
                    let _ = self.wbuf.split_to(n);
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                Err(e) => Err(e),
            },
            // TLS has no synchronous write; the next flush writes it.
            Stream::Tls(_) => Ok(()),
        };
        match result {
            Ok(()) => self.after_write(),
            Err(e) => self.lost(Lost::Io(e)),
        }
    }

    /// Writes the whole write buffer.
    pub(super) async fn flush(&mut self) {
        self.encode_queued();
        if self.wbuf.is_empty() {
            return;
        }
        let Link::Up(stream) = &mut self.link else {
            return;
        };
        let result = async {
            stream.write_all(&self.wbuf).await?;
            stream.flush().await
        }
        .await;
        match result {
            Ok(()) => {
                self.wbuf.clear();
                self.after_write();
            }
            Err(e) => self.lost(Lost::Io(e)),
        }
    }

    pub(super) fn after_write(&mut self) {
        if !self.env.qos1() && self.wbuf.is_empty() {
            // Written to the socket is all QoS 0 promises; the skew margin
            // bounds the arrival. Sends still in the buffer when a
            // connection breaks are written again instead.
            let now_ms = crate::now_ms();
            while let Some(p) = self.inflight.pop_front() {
                self.complete(p, now_ms);
            }
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > KEEP_WBUF {
            self.wbuf = BytesMut::new();
        }
        self.ping_at = Instant::now() + self.env.cfg.keep_alive / 2;
        if !self.wbuf.is_empty() {
            // Part is left: come back soon rather than at the next ping.
            self.ping_at = Instant::now();
        }
    }
}
