pub mod junit;
pub mod table;
