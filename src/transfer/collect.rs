//! The units' outcomes, gathered as they finish. Each output module is assembled, and encoded in
//! its type, as soon as its last unit has run; its units' f32 factors are dropped then. So a
//! transfer holds its output adapter once, as the file will hold it (half of f32 for a bf16
//! adapter), plus the modules still in flight — not every unit's factors until the end.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::assemble::assemble_module;
use super::execute::Outcome;
use super::report::ModuleRow;
use super::Opened;
use crate::error::Result;
use crate::io::adapter::EncodedFactors;

/// Takes each unit's outcome (units numbered in plan order) from any thread.
pub(super) struct Collector<'a> {
    opened: &'a Opened,
    /// For each unit: its module's index in the plan and its own index in that module.
    place: Vec<(usize, usize)>,
    modules: Mutex<Vec<ModuleSlot>>,
}

/// One output module on its way: its units' outcomes until the last is in, then what they made.
enum ModuleSlot {
    Waiting(Vec<Option<Outcome>>),
    Assembling,
    Done(Vec<ModuleRow>, EncodedFactors),
}

impl<'a> Collector<'a> {
    pub(super) fn new(opened: &'a Opened) -> Self {
        let plan = &opened.plan;
        let place = plan
            .modules
            .iter()
            .enumerate()
            .flat_map(|(m, module)| (0..module.units.len()).map(move |k| (m, k)))
            .collect();
        let modules = plan
            .modules
            .iter()
            .map(|m| ModuleSlot::Waiting(vec![None; m.units.len()]))
            .collect();
        Collector {
            opened,
            place,
            modules: Mutex::new(modules),
        }
    }

    /// Takes unit `unit`'s outcome; assembles its module when it was the module's last.
    pub(super) fn add(&self, unit: usize, outcome: Outcome) -> Result<()> {
        let (m, k) = self.place[unit];
        let complete = {
            let mut modules = self.modules.lock().expect("a collector thread panicked");
            let ModuleSlot::Waiting(outcomes) = &mut modules[m] else {
                panic!("unit {unit} reported after its module was assembled");
            };
            assert!(outcomes[k].is_none(), "unit {unit} reported twice");
            outcomes[k] = Some(outcome);
            if outcomes.iter().all(Option::is_some) {
                let ModuleSlot::Waiting(outcomes) =
                    std::mem::replace(&mut modules[m], ModuleSlot::Assembling)
                else {
                    unreachable!("matched above")
                };
                Some(outcomes)
            } else {
                None
            }
        };
        if let Some(outcomes) = complete {
            // Outside the lock: the other threads go on reporting while this module is built.
            let outcomes: Vec<Outcome> = outcomes.into_iter().flatten().collect();
            let done = self.assemble(m, &outcomes)?;
            self.modules.lock().expect("a collector thread panicked")[m] = done;
        }
        Ok(())
    }

    /// The report rows and the encoded output modules, in plan order.
    pub(super) fn finish(self) -> (Vec<ModuleRow>, BTreeMap<String, EncodedFactors>) {
        let plan = &self.opened.plan;
        let mut rows = Vec::with_capacity(self.place.len());
        let mut out = BTreeMap::new();
        let modules = self
            .modules
            .into_inner()
            .expect("a collector thread panicked");
        for (module, slot) in plan.modules.iter().zip(modules) {
            let ModuleSlot::Done(module_rows, factors) = slot else {
                panic!("module {} finished without all its units", module.name);
            };
            rows.extend(module_rows);
            out.insert(module.name.clone(), factors);
        }
        (rows, out)
    }

    /// Module `m`'s report rows and its output factors, from its units' outcomes.
    fn assemble(&self, m: usize, outcomes: &[Outcome]) -> Result<ModuleSlot> {
        let opened = self.opened;
        let module = &opened.plan.modules[m];
        let mut rows = Vec::with_capacity(outcomes.len());
        for (unit, o) in module.units.iter().zip(outcomes) {
            let full_s = opened.source.shape(&unit.source_tensor)?[0];
            rows.push(ModuleRow::new(
                unit,
                &module.name,
                full_s,
                module.shape.0,
                o,
            ));
        }
        let factors = assemble_module(module, outcomes, &opened.adapter)?.encode();
        Ok(ModuleSlot::Done(rows, factors))
    }
}
