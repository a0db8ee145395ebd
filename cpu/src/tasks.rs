//! Hardware task switches (JMP/CALL to a TSS or task gate, INT through a task gate, IRET
//! with NT set).
//!
//! TODO(protected-mode helper).
