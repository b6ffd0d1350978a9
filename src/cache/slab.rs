//! Slot storage threaded by intrusive doubly-linked lists: O(1) push, unlink and removal by slot.

/// "No slot" in the intrusive lists.
pub(super) const NIL: usize = usize::MAX;

struct Node<T> {
    value: T,
    prev: usize,
    next: usize,
}

/// Slot storage with intrusive doubly-linked lists: O(1) push, unlink and removal by slot.
pub(super) struct Slab<T> {
    nodes: Vec<Option<Node<T>>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            nodes: Vec::new(),
            free: Vec::new(),
        }
    }
}

/// One list threaded through a [`Slab`]; `head` is the newest.
pub(super) struct List {
    pub(super) head: usize,
    pub(super) tail: usize,
    pub(super) len: usize,
}

impl Default for List {
    fn default() -> Self {
        List {
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    pub(super) fn insert(&mut self, value: T) -> usize {
        let node = Some(Node {
            value,
            prev: NIL,
            next: NIL,
        });
        match self.free.pop() {
            Some(slot) => {
                self.nodes[slot] = node;
                slot
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    /// Frees an unlinked slot and returns its value.
    pub(super) fn take(&mut self, slot: usize) -> T {
        self.free.push(slot);
        self.nodes[slot].take().expect("slot taken twice").value
    }

    fn node(&mut self, slot: usize) -> &mut Node<T> {
        self.nodes[slot].as_mut().expect("linked slot is occupied")
    }

    pub(super) fn get(&self, slot: usize) -> &T {
        &self.nodes[slot]
            .as_ref()
            .expect("indexed slot is occupied")
            .value
    }

    pub(super) fn get_mut(&mut self, slot: usize) -> &mut T {
        &mut self.node(slot).value
    }

    pub(super) fn push_front(&mut self, list: &mut List, slot: usize) {
        let old_head = list.head;
        let node = self.node(slot);
        node.prev = NIL;
        node.next = old_head;
        if old_head == NIL {
            list.tail = slot;
        } else {
            self.node(old_head).prev = slot;
        }
        list.head = slot;
        list.len += 1;
    }

    pub(super) fn unlink(&mut self, list: &mut List, slot: usize) {
        let node = self.node(slot);
        let (prev, next) = (node.prev, node.next);
        node.prev = NIL;
        node.next = NIL;
        if prev == NIL {
            list.head = next;
        } else {
            self.node(prev).next = next;
        }
        if next == NIL {
            list.tail = prev;
        } else {
            self.node(next).prev = prev;
        }
        list.len -= 1;
    }
}
