//! Deciding a filter for one column value, in-process where Postgres's
//! comparison is exactly known, else saying that only the server can.
//!
//! A [`CompiledFilter`] is made once per subscription by
//! [`compile`](super::compile), which asks the server for the operand's
//! canonical text and picks a [`Plan`]. [`evaluate`] then costs a parse of
//! the column's text output and a comparison, with SQL's three-valued
//! logic; `None` sends the pair to [`evaluate_on_server`](super::evaluate_on_server).

use std::cmp::Ordering;
use std::sync::Arc;

use crate::catalog::TypeInfo;
use crate::change::Datum;

use super::filter::{Filter, IsTarget, Op};
use super::key::{Key, Numeric, Scalar, Time, compare};

/// The result of a filter for one value: SQL's three-valued logic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The condition holds: visible through this filter.
    True,
    /// It does not hold.
    False,
    /// It is NULL (unknown): not visible, and `not.` keeps it NULL.
    Null,
}

/// `NOT`: true and false swap, NULL stays NULL.
impl std::ops::Not for Verdict {
    type Output = Verdict;

    fn not(self) -> Verdict {
        match self {
            Verdict::True => Verdict::False,
            Verdict::False => Verdict::True,
            Verdict::Null => Verdict::Null,
        }
    }
}

impl Verdict {
    /// Whether the change is visible through the filter.
    pub fn is_true(self) -> bool {
        self == Verdict::True
    }

    /// A SQL boolean result (`None` is NULL).
    pub fn from_sql(value: Option<bool>) -> Verdict {
        match value {
            Some(true) => Verdict::True,
            Some(false) => Verdict::False,
            None => Verdict::Null,
        }
    }

    fn of(b: bool) -> Verdict {
        if b { Verdict::True } else { Verdict::False }
    }
}

/// The operand in the column type's canonical text (its output function
/// applied to the filter value cast to the type), as the server gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Canonical {
    /// One value (`eq`, `lt`, `like`, `isdistinct`, ...).
    Value(String),
    /// An `in` list; `None` is a NULL element.
    List(Vec<Option<String>>),
    /// `is` takes a keyword, not a value.
    Keyword(IsTarget),
}

/// How a compiled filter is decided.
#[derive(Debug, Clone)]
pub(super) enum Plan {
    /// Only the server knows the type's comparison.
    Server,
    /// `is.null` on a non-composite type: the datum is NULL or not.
    IsNull,
    /// `is.true`, `is.false`, `is.unknown` on a boolean column.
    IsBool(IsTarget),
    /// `eq neq lt lte gt gte isdistinct` against one key.
    Compare {
        /// How column values are read.
        scalar: Scalar,
        /// The operand.
        operand: Key<Box<[u8]>>,
    },
    /// `in` against a list (`None`: a NULL element).
    In {
        /// How column values are read.
        scalar: Scalar,
        /// The elements.
        list: Vec<Option<Key<Box<[u8]>>>>,
    },
}

/// A filter checked against its column and ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    pub(super) filter: Filter,
    pub(super) column: usize,
    pub(super) ty: Arc<TypeInfo>,
    /// The column type without typmod, as `format_type` quotes it.
    pub(super) sql_type: Arc<str>,
    /// The column's collation, qualified and quoted by the server.
    pub(super) collation: Option<Arc<str>>,
    pub(super) canonical: Canonical,
    pub(super) plan: Plan,
}

impl CompiledFilter {
    /// The filter as parsed.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// The column's position in the relation (an index into a
    /// [`Row`](crate::change::Row)).
    pub fn column_index(&self) -> usize {
        self.column
    }

    /// The column's type.
    pub fn type_info(&self) -> &Arc<TypeInfo> {
        &self.ty
    }

    /// The operand in the type's canonical text.
    pub fn canonical(&self) -> &Canonical {
        &self.canonical
    }

    /// Whether [`evaluate`] decides every value itself (an absent value
    /// aside, it never returns `None`, except for a value not in the
    /// type's text form, which the server then reads).
    pub fn is_in_process(&self) -> bool {
        !matches!(self.plan, Plan::Server)
    }

    /// For a filter that holds exactly when the value equals one of a few
    /// operands (`eq` or `in`, not negated, decided in-process): those
    /// operands as hash keys, so subscriptions can be indexed by them.
    /// The NULL elements of an `in` list are left out: they never make it
    /// hold.
    pub fn equality_keys(&self) -> Option<Vec<EqualityKey>> {
        if self.filter.negated {
            return None;
        }
        match (&self.plan, self.filter.op) {
            (Plan::Compare { operand, .. }, Op::Eq) => Some(vec![EqualityKey::of(&operand.view())]),
            (Plan::In { list, .. }, Op::In) => Some(
                list.iter()
                    .flatten()
                    .map(|k| EqualityKey::of(&k.view()))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The hash key of a column value, to look up the filters of the same
    /// column by their [`equality_keys`](Self::equality_keys); `None` for
    /// a NULL or absent value (it equals nothing) or one only the server
    /// reads.
    pub fn equality_key_of(&self, value: &Datum) -> Option<EqualityKey> {
        let (Plan::Compare { scalar, .. } | Plan::In { scalar, .. }) = &self.plan else {
            return None;
        };
        match value {
            Datum::Text(text) => Some(EqualityKey::of(&scalar.parse(text)?)),
            _ => None,
        }
    }
}

/// A value reduced so that two values of one column are equal in Postgres
/// exactly when their keys are equal (`1.5` and `1.50`, `-0` and `0`, NaN
/// and NaN): a hash key for indexing `eq` and `in` filters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EqualityKey(EqualityRepr);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum EqualityRepr {
    Int(i64),
    /// Bits of the float, with -0 as 0 and one NaN.
    Float(u64),
    /// Sign, integer and fraction digits, normalized; or an infinity / NaN.
    Numeric(Numeric<Box<[u8]>>),
    Bool(bool),
    Bytes(Box<[u8]>),
    Time(Time),
}

impl EqualityKey {
    fn of(key: &Key<&[u8]>) -> EqualityKey {
        EqualityKey(match key {
            Key::Int(i) => EqualityRepr::Int(*i),
            Key::Float(f) if f.is_nan() => EqualityRepr::Float(f64::NAN.to_bits()),
            Key::Float(f) if *f == 0.0 => EqualityRepr::Float(0f64.to_bits()),
            Key::Float(f) => EqualityRepr::Float(f.to_bits()),
            Key::Numeric(n) => EqualityRepr::Numeric(match n {
                Numeric::NegInfinity => Numeric::NegInfinity,
                Numeric::Finite {
                    negative,
                    int,
                    frac,
                } => Numeric::Finite {
                    negative: *negative,
                    int: Box::from(*int),
                    frac: Box::from(*frac),
                },
                Numeric::Infinity => Numeric::Infinity,
                Numeric::NaN => Numeric::NaN,
            }),
            Key::Bool(b) => EqualityRepr::Bool(*b),
            Key::Bytes(b) => EqualityRepr::Bytes(Box::from(*b)),
            Key::Time(t) => EqualityRepr::Time(*t),
        })
    }
}

/// The filter's verdict for `value`, the column's datum in the change;
/// `None` when only the server can decide (see
/// [`evaluate_on_server`](super::evaluate_on_server)).
///
/// An unchanged TOASTed value is absent, and a filter on an absent column
/// is never satisfied (Supabase's rule): `Null`, whatever `not.` says.
pub fn evaluate(filter: &CompiledFilter, value: &Datum) -> Option<Verdict> {
    if matches!(value, Datum::UnchangedToast) {
        return Some(Verdict::Null);
    }
    let verdict = decide(filter, value)?;
    Some(if filter.filter.negated {
        !verdict
    } else {
        verdict
    })
}

/// The verdict of all `filters` (AND) for `row`, when every one is decided
/// in-process or one already fails: `Some(true)` visible, `Some(false)`
/// not, `None` when the server must decide some. A filter whose column is
/// not in the row fails.
pub fn evaluate_all(filters: &[CompiledFilter], row: &[Datum]) -> Option<bool> {
    let mut undecided = false;
    for filter in filters {
        match row.get(filter.column).map(|value| evaluate(filter, value)) {
            None | Some(Some(Verdict::False | Verdict::Null)) => return Some(false),
            Some(Some(Verdict::True)) => {}
            Some(None) => undecided = true,
        }
    }
    (!undecided).then_some(true)
}

/// The verdict before `not.`.
fn decide(filter: &CompiledFilter, value: &Datum) -> Option<Verdict> {
    let op = filter.filter.op;
    let text = match value {
        Datum::Text(text) => Some(&text[..]),
        Datum::Null => None,
        // Json: a rendered value; it is not NULL, but only the type's text
        // can be compared.
        Datum::Json(_) | Datum::UnchangedToast => {
            return matches!(filter.plan, Plan::IsNull).then_some(Verdict::False);
        }
    };
    Some(match (&filter.plan, text) {
        (Plan::Server, _) => return None,
        (Plan::IsNull, text) => Verdict::of(text.is_none()),
        (Plan::IsBool(target), None) => Verdict::of(*target == IsTarget::Unknown),
        (Plan::IsBool(target), Some(text)) => {
            let Key::Bool(b) = Scalar::Bool.parse(text)? else {
                return None;
            };
            Verdict::of(match target {
                IsTarget::True => b,
                IsTarget::False => !b,
                IsTarget::Null | IsTarget::Unknown => false,
            })
        }
        // NULL IS DISTINCT FROM a value; NULL compared with anything is NULL.
        (Plan::Compare { .. }, None) if op == Op::IsDistinct => Verdict::True,
        (Plan::Compare { .. }, None) => Verdict::Null,
        (Plan::Compare { scalar, operand }, Some(text)) => {
            let order = compare(&scalar.parse(text)?, &operand.view())?;
            Verdict::of(match op {
                Op::Eq => order == Ordering::Equal,
                Op::Neq | Op::IsDistinct => order != Ordering::Equal,
                Op::Lt => order == Ordering::Less,
                Op::Lte => order != Ordering::Greater,
                Op::Gt => order == Ordering::Greater,
                Op::Gte => order != Ordering::Less,
                _ => return None,
            })
        }
        // `= ANY('{}')` is false even for NULL.
        (Plan::In { list, .. }, None) if list.is_empty() => Verdict::False,
        (Plan::In { .. }, None) => Verdict::Null,
        (Plan::In { scalar, list }, Some(text)) => {
            let key = scalar.parse(text)?;
            let mut null = false;
            for item in list {
                match item {
                    Some(item) if compare(&key, &item.view())? == Ordering::Equal => {
                        return Some(Verdict::True);
                    }
                    Some(_) => {}
                    None => null = true,
                }
            }
            if null { Verdict::Null } else { Verdict::False }
        }
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::filter::{Operand, parse};
    use super::*;
    use crate::catalog::builtin;

    /// A filter compiled without a server: the canonical text is the
    /// operand as written (the tests write canonical operands).
    fn local(text: &str, scalar: Option<Scalar>) -> CompiledFilter {
        let filter = parse(text).unwrap().remove(0);
        let key = |s: &str| {
            scalar
                .and_then(|sc| sc.parse(s.as_bytes()))
                .map(|k| k.to_owned_key())
        };
        let (canonical, plan) = match (&filter.operand, filter.op) {
            (Operand::Is(t), _) if *t == IsTarget::Null => (Canonical::Keyword(*t), Plan::IsNull),
            (Operand::Is(t), _) => (Canonical::Keyword(*t), Plan::IsBool(*t)),
            (Operand::List(items), _) => (
                Canonical::List(items.clone()),
                match scalar {
                    Some(scalar) => Plan::In {
                        scalar,
                        list: items.iter().map(|i| i.as_deref().and_then(key)).collect(),
                    },
                    None => Plan::Server,
                },
            ),
            (Operand::Value(v), _) => (
                Canonical::Value(v.clone()),
                match (scalar, key(v)) {
                    (Some(scalar), Some(operand)) => Plan::Compare { scalar, operand },
                    _ => Plan::Server,
                },
            ),
        };
        CompiledFilter {
            filter,
            column: 0,
            ty: builtin(25).unwrap(),
            sql_type: Arc::from("text"),
            collation: None,
            canonical,
            plan,
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn check(filter: &str, scalar: Option<Scalar>, cases: &[(Datum, Option<Verdict>)]) {
        let compiled = local(filter, scalar);
        for (datum, expected) in cases {
            assert_eq!(
                evaluate(&compiled, datum),
                *expected,
                "{filter} on {datum:?}"
            );
        }
    }

    use Verdict::{False as F, Null as N, True as T};

    #[test]
    fn comparisons_follow_the_type() {
        let int = Some(Scalar::Int);
        check(
            "c=eq.7",
            int,
            &[
                (text("7"), Some(T)),
                (text("8"), Some(F)),
                (Datum::Null, Some(N)),
            ],
        );
        check(
            "c=not.eq.7",
            int,
            &[
                (text("7"), Some(F)),
                (text("8"), Some(T)),
                (Datum::Null, Some(N)),
            ],
        );
        check(
            "c=lt.7",
            int,
            &[
                (text("-8"), Some(T)),
                (text("7"), Some(F)),
                (text("70"), Some(F)),
            ],
        );
        check(
            "c=lte.7",
            int,
            &[(text("7"), Some(T)), (text("8"), Some(F))],
        );
        check(
            "c=gt.7",
            int,
            &[(text("10"), Some(T)), (text("7"), Some(F))],
        );
        check(
            "c=gte.7",
            int,
            &[(text("7"), Some(T)), (text("6"), Some(F))],
        );
        check(
            "c=neq.7",
            int,
            &[
                (text("7"), Some(F)),
                (text("6"), Some(T)),
                (Datum::Null, Some(N)),
            ],
        );
        let num = Some(Scalar::Numeric);
        check(
            "c=eq.1.5",
            num,
            &[(text("1.50"), Some(T)), (text("NaN"), Some(F))],
        );
        check(
            "c=lt.NaN",
            num,
            &[(text("Infinity"), Some(T)), (text("NaN"), Some(F))],
        );
        let float = Some(Scalar::Float);
        check(
            "c=eq.NaN",
            float,
            &[(text("NaN"), Some(T)), (text("Infinity"), Some(F))],
        );
        check("c=eq.0", float, &[(text("-0"), Some(T))]);
        // Not the type's text form: the server reads it.
        check("c=eq.7", int, &[(text("seven"), None)]);
    }

    #[test]
    fn isdistinct_never_is_null() {
        let int = Some(Scalar::Int);
        check(
            "c=isdistinct.7",
            int,
            &[
                (text("7"), Some(F)),
                (text("8"), Some(T)),
                (Datum::Null, Some(T)),
            ],
        );
        check(
            "c=not.isdistinct.7",
            int,
            &[(text("7"), Some(T)), (Datum::Null, Some(F))],
        );
    }

    #[test]
    fn in_lists_with_nulls_and_empty_lists() {
        let int = Some(Scalar::Int);
        check(
            "c=in.(1,2)",
            int,
            &[
                (text("2"), Some(T)),
                (text("3"), Some(F)),
                (Datum::Null, Some(N)),
            ],
        );
        check(
            "c=in.(1,NULL)",
            int,
            &[(text("1"), Some(T)), (text("3"), Some(N))],
        );
        check(
            "c=not.in.(1,NULL)",
            int,
            &[(text("1"), Some(F)), (text("3"), Some(N))],
        );
        check(
            "c=in.()",
            int,
            &[(text("1"), Some(F)), (Datum::Null, Some(F))],
        );
        check("c=not.in.()", int, &[(Datum::Null, Some(T))]);
    }

    #[test]
    fn is_tests() {
        check(
            "c=is.null",
            None,
            &[
                (Datum::Null, Some(T)),
                (text(""), Some(F)),
                (Datum::Json(Bytes::new()), Some(F)),
            ],
        );
        check(
            "c=not.is.null",
            None,
            &[(Datum::Null, Some(F)), (text("x"), Some(T))],
        );
        check(
            "c=is.true",
            None,
            &[
                (text("t"), Some(T)),
                (text("f"), Some(F)),
                (Datum::Null, Some(F)),
            ],
        );
        check(
            "c=is.false",
            None,
            &[(text("f"), Some(T)), (Datum::Null, Some(F))],
        );
        check(
            "c=is.unknown",
            None,
            &[(text("f"), Some(F)), (Datum::Null, Some(T))],
        );
        check(
            "c=not.is.unknown",
            None,
            &[(text("t"), Some(T)), (Datum::Null, Some(F))],
        );
    }

    #[test]
    fn absent_values_never_pass_even_negated() {
        for filter in [
            "c=eq.1",
            "c=not.eq.1",
            "c=is.null",
            "c=not.is.null",
            "c=not.in.()",
        ] {
            check(
                filter,
                Some(Scalar::Int),
                &[(Datum::UnchangedToast, Some(N))],
            );
        }
    }

    #[test]
    fn server_plans_defer_but_absent_values_do_not() {
        check(
            "c=like.a%",
            None,
            &[
                (text("abc"), None),
                (Datum::Null, None),
                (Datum::UnchangedToast, Some(N)),
            ],
        );
    }

    #[test]
    fn equality_keys_are_exact() {
        let cases = [
            ("c=eq.1.5", Scalar::Numeric, "1.50", true),
            ("c=eq.-0", Scalar::Numeric, "0.000", true),
            ("c=eq.1.5", Scalar::Numeric, "1.51", false),
            ("c=eq.0", Scalar::Float, "-0", true),
            ("c=eq.NaN", Scalar::Float, "NaN", true),
            ("c=eq.7", Scalar::Int, "07", true),
            ("c=in.(1,NULL,3)", Scalar::Int, "3", true),
            ("c=in.(1,NULL,3)", Scalar::Int, "2", false),
        ];
        for (text, scalar, value, equal) in cases {
            let f = local(text, Some(scalar));
            let keys = f.equality_keys().unwrap();
            let key = f.equality_key_of(&Datum::Text(Bytes::copy_from_slice(value.as_bytes())));
            assert_eq!(keys.contains(&key.unwrap()), equal, "{text} {value}");
        }
        assert_eq!(local("c=not.eq.1", Some(Scalar::Int)).equality_keys(), None);
        assert_eq!(local("c=lt.1", Some(Scalar::Int)).equality_keys(), None);
        assert_eq!(local("c=eq.1", None).equality_keys(), None);
        let f = local("c=eq.1", Some(Scalar::Int));
        assert_eq!(f.equality_key_of(&Datum::Null), None);
        assert_eq!(f.equality_key_of(&Datum::UnchangedToast), None);
    }

    #[test]
    fn evaluate_all_is_and() {
        let filters = [
            local("c=gt.1", Some(Scalar::Int)),
            local("c=lt.10", Some(Scalar::Int)),
        ];
        assert_eq!(evaluate_all(&filters, &[text("5")]), Some(true));
        assert_eq!(evaluate_all(&filters, &[text("10")]), Some(false));
        assert_eq!(evaluate_all(&filters, &[]), Some(false));
        let mixed = [
            local("c=like.a%", None),
            local("c=lt.10", Some(Scalar::Int)),
        ];
        assert_eq!(evaluate_all(&mixed, &[text("5")]), None);
        assert_eq!(evaluate_all(&mixed, &[text("50")]), Some(false));
        assert_eq!(evaluate_all(&[], &[]), Some(true));
    }
}
