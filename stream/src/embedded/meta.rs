//! The log's meta file: what a directory was created with, so a later open
//! with other settings fails instead of misreading it.
//!
//! ```text
//! iotpipe-embedded-log
//! format 1
//! shards 4
//! ```

pub(crate) const FILE_NAME: &str = "meta";
pub(crate) const TEMP_NAME: &str = ".meta.tmp";
const MAGIC: &str = "iotpipe-embedded-log";
/// Bumped whenever segments, checkpoints or this file change shape.
pub(crate) const FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub format: u32,
    pub shards: u32,
}

impl Meta {
    pub(crate) fn current(shards: u32) -> Self {
        Meta {
            format: FORMAT,
            shards,
        }
    }

    pub(crate) fn render(&self) -> String {
        format!("{MAGIC}\nformat {}\nshards {}\n", self.format, self.shards)
    }

    pub(crate) fn parse(text: &str) -> Result<Meta, String> {
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(format!("does not start with {MAGIC:?}"));
        }
        let mut format = None;
        let mut shards = None;
        for line in lines {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("bad line {line:?}"))?;
            let value: u32 = value
                .parse()
                .map_err(|_| format!("bad number in line {line:?}"))?;
            match key {
                "format" => format = Some(value),
                "shards" => shards = Some(value),
                // Later formats may add keys; the format number decides
                // whether this version can read the directory.
                _ => {}
            }
        }
        Ok(Meta {
            format: format.ok_or("no format line")?,
            shards: shards.ok_or("no shards line")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_strangers() {
        let meta = Meta::current(8);
        assert_eq!(Meta::parse(&meta.render()), Ok(meta));
        assert!(Meta::parse("something else\nformat 1\nshards 4\n").is_err());
        assert!(Meta::parse(&format!("{MAGIC}\nformat 1\n")).is_err());
        assert!(Meta::parse(&format!("{MAGIC}\nformat x\nshards 4\n")).is_err());
    }
}
