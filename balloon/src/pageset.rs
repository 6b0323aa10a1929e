//! A set of 4 KiB guest pages, stored per 2 MiB block: an empty or full block costs one byte,
//! only partly set blocks carry a 512-bit bitmap. Free page reporting at order 9 (Linux's
//! default) and ballooning of large areas produce whole blocks, so a VM's page sets stay small.

use crate::backend::RamMap;
use crate::PAGE_SIZE;

/// Pages per block (2 MiB of 4 KiB pages).
const BLOCK_PAGES: u64 = 512;
const WORDS: usize = (BLOCK_PAGES / 64) as usize;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Block {
    Empty,
    Full,
    Partial(Box<[u64; WORDS]>),
}

impl Block {
    fn words(&self) -> [u64; WORDS] {
        match self {
            Block::Empty => [0; WORDS],
            Block::Full => [u64::MAX; WORDS],
            Block::Partial(w) => **w,
        }
    }

    fn from_words(w: [u64; WORDS]) -> Block {
        if w.iter().all(|x| *x == 0) {
            Block::Empty
        } else if w.iter().all(|x| *x == u64::MAX) {
            Block::Full
        } else {
            Block::Partial(Box::new(w))
        }
    }

    fn count(&self) -> u64 {
        match self {
            Block::Empty => 0,
            Block::Full => BLOCK_PAGES,
            Block::Partial(w) => w.iter().map(|x| u64::from(x.count_ones())).sum(),
        }
    }

    fn bit(&self, i: u64) -> bool {
        match self {
            Block::Empty => false,
            Block::Full => true,
            Block::Partial(w) => w[(i / 64) as usize] & (1 << (i % 64)) != 0,
        }
    }
}

/// Mask of bits `[lo, hi)` of a block, as words.
fn mask(lo: u64, hi: u64) -> [u64; WORDS] {
    let mut m = [0u64; WORDS];
    for (i, w) in m.iter_mut().enumerate() {
        let base = i as u64 * 64;
        let a = lo.max(base);
        let b = hi.min(base + 64);
        if a < b {
            let n = b - a;
            *w = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << (a - base)
            };
        }
    }
    m
}

/// A set of 4 KiB guest pages over a [`RamMap`].
#[derive(Clone, Debug)]
pub struct PageSet {
    ram: RamMap,
    /// Per RAM range: its first page index in the set's index space.
    first_page: Vec<u64>,
    blocks: Vec<Block>,
    count: u64,
}

impl PageSet {
    /// An empty set over `ram`.
    pub fn new(ram: &RamMap) -> Self {
        let mut first_page = Vec::with_capacity(ram.ranges().len());
        let mut pages = 0u64;
        for &(_, len) in ram.ranges() {
            first_page.push(pages);
            pages += len / PAGE_SIZE;
        }
        PageSet {
            ram: ram.clone(),
            first_page,
            blocks: vec![Block::Empty; pages.div_ceil(BLOCK_PAGES) as usize],
            count: 0,
        }
    }

    /// Number of pages in the set.
    pub fn pages(&self) -> u64 {
        self.count
    }

    /// Bytes in the set.
    pub fn bytes(&self) -> u64 {
        self.count * PAGE_SIZE
    }

    /// Heap bytes the set uses (block table plus partial-block bitmaps).
    pub fn heap_bytes(&self) -> u64 {
        let table = self.blocks.capacity() * std::mem::size_of::<Block>();
        let partial = self
            .blocks
            .iter()
            .filter(|b| matches!(b, Block::Partial(_)))
            .count()
            * WORDS
            * 8;
        (table + partial) as u64
    }

    /// Index range `(first, n)` of the piece of `[gpa, gpa+len)` inside RAM range `idx`.
    fn piece(&self, idx: usize, gpa: u64, len: u64) -> Option<(u64, u64)> {
        let (s, l) = self.ram.ranges()[idx];
        let fp = self.first_page[idx];
        let a = s.max(gpa);
        let b = (s + l).min(gpa.saturating_add(len));
        (a < b).then(|| {
            let first = fp + (a - s) / PAGE_SIZE;
            (first, fp + (b - s).div_ceil(PAGE_SIZE) - first)
        })
    }

    /// Index ranges `(first, n)` of the pieces of `[gpa, gpa+len)` inside RAM.
    fn pieces(&self, gpa: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        (0..self.ram.ranges().len()).filter_map(move |i| self.piece(i, gpa, len))
    }

    /// Apply `f(block, new_block_given_old)` to the blocks of index range `[first, first+n)`;
    /// `f` gets the block index and the in-block bit range and returns the new block. Returns
    /// the change in the set's size.
    fn update(
        &mut self,
        first: u64,
        n: u64,
        mut f: impl FnMut(usize, &Block, u64, u64) -> Block,
    ) -> i64 {
        let mut delta = 0i64;
        let end = first + n;
        let mut i = first;
        while i < end {
            let b = (i / BLOCK_PAGES) as usize;
            let lo = i % BLOCK_PAGES;
            let hi = (end - b as u64 * BLOCK_PAGES).min(BLOCK_PAGES);
            let old = &self.blocks[b];
            let new = f(b, old, lo, hi);
            delta += new.count() as i64 - old.count() as i64;
            self.blocks[b] = new;
            i = (b as u64 + 1) * BLOCK_PAGES;
        }
        delta
    }

    /// Add `[gpa, gpa+len)` minus the pages in `except`; returns how many pages were added.
    /// `except` must be a set over the same RAM map.
    pub fn insert_except(&mut self, gpa: u64, len: u64, except: Option<&PageSet>) -> u64 {
        let mut added = 0i64;
        for idx in 0..self.ram.ranges().len() {
            let Some((first, n)) = self.piece(idx, gpa, len) else {
                continue;
            };
            added += self.update(first, n, |b, old, lo, hi| {
                let excl = except
                    .and_then(|e| e.blocks.get(b))
                    .unwrap_or(&Block::Empty);
                match (excl, lo == 0 && hi == BLOCK_PAGES) {
                    (Block::Empty, true) => Block::Full,
                    (Block::Full, _) => old.clone(),
                    _ => {
                        let (mut w, m, x) = (old.words(), mask(lo, hi), excl.words());
                        for k in 0..WORDS {
                            w[k] |= m[k] & !x[k];
                        }
                        Block::from_words(w)
                    }
                }
            });
        }
        let added = added.unsigned_abs();
        self.count += added;
        added
    }

    /// Add `[gpa, gpa+len)`; returns how many pages were added.
    pub fn insert(&mut self, gpa: u64, len: u64) -> u64 {
        self.insert_except(gpa, len, None)
    }

    /// Remove `[gpa, gpa+len)`; returns how many pages were removed.
    pub fn remove(&mut self, gpa: u64, len: u64) -> u64 {
        let mut removed = 0i64;
        for idx in 0..self.ram.ranges().len() {
            let Some((first, n)) = self.piece(idx, gpa, len) else {
                continue;
            };
            removed += self.update(first, n, |_, old, lo, hi| {
                if lo == 0 && hi == BLOCK_PAGES {
                    return Block::Empty;
                }
                let (mut w, m) = (old.words(), mask(lo, hi));
                for k in 0..WORDS {
                    w[k] &= !m[k];
                }
                Block::from_words(w)
            });
        }
        let removed = removed.unsigned_abs();
        self.count -= removed;
        removed
    }

    /// How many pages of `[gpa, gpa+len)` are in the set.
    pub fn count_in(&self, gpa: u64, len: u64) -> u64 {
        let mut total = 0;
        for (first, n) in self.pieces(gpa, len) {
            let end = first + n;
            let mut i = first;
            while i < end {
                let b = (i / BLOCK_PAGES) as usize;
                let lo = i % BLOCK_PAGES;
                let hi = (end - b as u64 * BLOCK_PAGES).min(BLOCK_PAGES);
                total += match &self.blocks[b] {
                    Block::Empty => 0,
                    Block::Full => hi - lo,
                    Block::Partial(w) => {
                        let m = mask(lo, hi);
                        w.iter()
                            .zip(m)
                            .map(|(x, m)| u64::from((x & m).count_ones()))
                            .sum()
                    }
                };
                i = (b as u64 + 1) * BLOCK_PAGES;
            }
        }
        total
    }

    /// Whether the page at `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        self.pieces(gpa, 1)
            .any(|(i, _)| self.blocks[(i / BLOCK_PAGES) as usize].bit(i % BLOCK_PAGES))
    }

    /// Maximal runs `(gpa, len)` of pages in the set.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |gpa: u64, len: u64| match out.last_mut() {
            Some(last) if last.0 + last.1 == gpa => last.1 += len,
            _ => out.push((gpa, len)),
        };
        for (&(s, l), &fp) in self.ram.ranges().iter().zip(&self.first_page) {
            let end = fp + l / PAGE_SIZE;
            let mut i = fp;
            while i < end {
                let b = (i / BLOCK_PAGES) as usize;
                let lo = i % BLOCK_PAGES;
                let hi = (end - b as u64 * BLOCK_PAGES).min(BLOCK_PAGES);
                let gpa = s + (i - fp) * PAGE_SIZE;
                match &self.blocks[b] {
                    Block::Empty => {}
                    Block::Full => push(gpa, (hi - lo) * PAGE_SIZE),
                    blk @ Block::Partial(_) => {
                        for bit in lo..hi {
                            if blk.bit(bit) {
                                push(gpa + (bit - lo) * PAGE_SIZE, PAGE_SIZE);
                            }
                        }
                    }
                }
                i += hi - lo;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> RamMap {
        RamMap::new(&[(0, 0x40_0000), (0x100_0000, 0x20_0000)]).unwrap()
    }

    #[test]
    fn insert_remove_runs() {
        let mut s = PageSet::new(&ram());
        assert_eq!(s.insert(0x1000, 0x3000), 3);
        assert_eq!(s.insert(0x2000, 0x3000), 1);
        assert_eq!(s.pages(), 4);
        assert!(s.contains(0x4000) && !s.contains(0x5000) && !s.contains(0x0));
        assert_eq!(s.insert(0x3f_f000, 0x1000), 1);
        assert_eq!(s.insert(0x100_0000, 0x20_0000), 512);
        assert_eq!(
            s.runs(),
            vec![
                (0x1000, 0x4000),
                (0x3f_f000, 0x1000),
                (0x100_0000, 0x20_0000)
            ]
        );
        assert_eq!(s.remove(0x100_1000, 0x10_0000), 256);
        assert_eq!(s.remove(0x0, 0x40_0000), 5);
        assert_eq!(s.pages(), 256);
        assert_eq!(s.runs(), vec![(0x100_0000, 0x1000), (0x110_1000, 0xff000)]);
        let mut t = PageSet::new(&ram());
        assert_eq!(t.insert_except(0x100_0000, 0x20_0000, Some(&s)), 256);
        assert_eq!(s.count_in(0x100_0000, 0x20_0000), 256);
        assert_eq!(s.count_in(0x100_0000, 0x2000), 1);
        assert_eq!(s.count_in(0x0, 0x40_0000), 0);
        assert_eq!(
            s.count_in(0x40_0000, 0xc0_2000),
            1,
            "the hole counts nothing"
        );
        assert_eq!(t.count_in(0, u64::MAX), 256);
    }

    #[test]
    fn whole_blocks_need_no_bitmap() {
        // 1 GiB of RAM: 512 blocks.
        let big = RamMap::new(&[(0, 1 << 30)]).unwrap();
        let mut s = PageSet::new(&big);
        let table = s.heap_bytes();
        assert!(table <= 512 * 16, "{table}");
        s.insert(0, 1 << 30);
        assert_eq!(s.pages(), 1 << 18);
        assert_eq!(s.heap_bytes(), table);
        assert_eq!(s.runs(), vec![(0, 1 << 30)]);
        s.remove(0x1000, 0x1000);
        assert_eq!(s.heap_bytes(), table + 64);
        s.insert(0x1000, 0x1000);
        assert_eq!(
            s.heap_bytes(),
            table,
            "a block that fills up again drops its bitmap"
        );
    }
}
