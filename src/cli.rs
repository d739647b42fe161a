//! The command line: `myelin serve` (the default) and `myelin user ...`.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, CONFIG_FILE_ENV};
use crate::services::accounts::Accounts;
use crate::services::archive::Archiver;
use crate::services::clock::SystemClock;
use crate::services::stream::StreamCounter;
use crate::services::Services;
use crate::storage::{Storage, StorageError};

#[derive(Parser, Debug)]
#[command(name = "myelin", version, about = "Myelin, a Matrix homeserver")]
pub struct Cli {
    /// Configuration file (TOML). Without one, defaults and MYELIN_* variables apply.
    #[arg(long, short, global = true, env = CONFIG_FILE_ENV, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the homeserver (the default).
    Serve,
    /// Manage local accounts; the server must not be running.
    User {
        #[command(subcommand)]
        action: UserCommand,
    },
    /// Read what users reported to the admins; the server must not be
    /// running.
    Report {
        #[command(subcommand)]
        action: ReportCommand,
    },
    /// The archive tier of old events; `run` and `compact` need the server
    /// stopped.
    Archive {
        #[command(subcommand)]
        action: ArchiveCommand,
    },
    /// List and delete rooms; the server must not be running.
    Room {
        #[command(subcommand)]
        action: RoomCommand,
    },
    /// Write a consistent backup of the database and its media files into
    /// DIR (new or empty); while the server runs, the server takes it.
    Backup { dir: PathBuf },
    /// Make the configured data directory (which must have no database
    /// yet) from the backup in DIR.
    Restore { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
enum RoomCommand {
    /// Print every room this server has, one JSON object per line.
    List,
    /// Take every local member out of a room, remove its local aliases and
    /// directory entry, and delete everything stored about it.
    Delete {
        room_id: String,
        /// Also block the room: no local user may join it again.
        #[arg(long)]
        block: bool,
        /// Keep the room's events and state (only take the members out).
        #[arg(long)]
        no_purge: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ArchiveCommand {
    /// Print how many events are hot and archived, and their bytes per
    /// event, as one JSON object (also while the server runs).
    Status,
    /// Finish the mover's pass now (or make one), as the server would.
    Run,
    /// Rewrite the event tables' files into their settled, compressed
    /// form, so that `status` shows their lasting size.
    Compact,
}

#[derive(Subcommand, Debug)]
enum ReportCommand {
    /// Print the reports, oldest first, one JSON object per line.
    List {
        /// Only the reports after this report ID.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Create an account.
    Add {
        /// The localpart of the new user ID (the `alice` of `@alice:example.org`).
        name: String,
        /// The password; asked for when omitted.
        #[arg(long)]
        password: Option<String>,
        /// Make the account a server administrator.
        #[arg(long)]
        admin: bool,
    },
    /// Print every local account, one JSON object per line.
    List {
        /// Deactivated accounts too.
        #[arg(long)]
        deactivated: bool,
    },
    /// Deactivate an account for good: its devices, profile and email
    /// addresses go and it leaves every room.
    Deactivate {
        name: String,
        /// Also hide the user's events from those who were not in the room
        /// when they were sent.
        #[arg(long)]
        erase: bool,
    },
    /// Set a new password and log out every device of the account.
    ResetPassword {
        name: String,
        /// The new password; asked for when omitted.
        #[arg(long)]
        password: Option<String>,
    },
}

/// Parses the command line, runs the command, and gives the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_environment(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("myelin: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("myelin: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime
            .block_on(async {
                raise_file_limit();
                crate::server::run(config).await
            })
            .map_err(|e| e.to_string()),
        Command::User { action } => runtime.block_on(user_command(config, action)),
        Command::Report { action } => report_command(config, action),
        Command::Archive { action } => runtime.block_on(archive_command(config, action)),
        Command::Room { action } => runtime.block_on(room_command(config, action)),
        Command::Backup { dir } => runtime.block_on(backup_command(config, dir)),
        Command::Restore { dir } => restore_command(config, dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("myelin: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Every waiting client holds a socket: lift the soft limit on open files
/// (often 1,024) to the hard limit the system allows.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        tracing::debug!(open_files = limit.rlim_cur, "file limit raised");
    } else {
        tracing::warn!("could not raise the limit on open files");
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn archive_command(config: Config, action: ArchiveCommand) -> Result<(), String> {
    let storage = match (crate::server::open_storage(&config), &action) {
        (Ok(storage), _) => storage,
        // The server has the database: its figures can still be read.
        (Err(StorageError::InUse(_)), ArchiveCommand::Status) => Storage::open_read_only(
            &config.data_dir.join("db"),
            &crate::server::archive_files(&config),
        )
        .map_err(|e| e.to_string())?,
        (Err(error), _) => return Err(error.to_string()),
    };
    let archiver = Archiver::new(
        storage,
        Arc::new(SystemClock),
        config.archive.clone(),
        config.retention.clone(),
    );
    match action {
        ArchiveCommand::Status => {}
        ArchiveCommand::Run => {
            let moved = archiver.pass(None).await.map_err(|e| e.to_string())?;
            eprintln!("{moved} events archived");
        }
        ArchiveCommand::Compact => archiver.compact().map_err(|e| e.to_string())?,
    }
    let status = archiver.status().map_err(|e| e.to_string())?;
    println!("{}", status.to_json());
    Ok(())
}

fn report_command(config: Config, action: ReportCommand) -> Result<(), String> {
    let storage = crate::server::open_storage(&config).map_err(|e| e.to_string())?;
    let reports = crate::services::reports::Reports::new(storage).map_err(|e| e.to_string())?;
    match action {
        ReportCommand::List { after, limit } => {
            for report in reports.list(after, limit).map_err(|e| e.to_string())? {
                println!("{report}");
            }
        }
    }
    Ok(())
}

/// The whole service graph over the database, for the commands that act
/// as the server would (the server must be stopped).
fn services(config: Config) -> Result<Services, String> {
    let storage = crate::server::open_storage(&config).map_err(|e| e.to_string())?;
    Services::new(Arc::new(config), storage, Arc::new(SystemClock)).map_err(|e| e.to_string())
}

/// Who the command line's admin actions are recorded as.
const OPERATOR: &str = "the command line";

async fn room_command(config: Config, action: RoomCommand) -> Result<(), String> {
    let services = services(config)?;
    match action {
        RoomCommand::List => {
            for room_id in services.rooms.room_ids().map_err(|e| e.to_string())? {
                let Some(record) = services.rooms.room(&room_id).map_err(|e| e.to_string())? else {
                    continue;
                };
                let name = services
                    .rooms
                    .state_event(&room_id, "m.room.name", "")
                    .map_err(|e| e.to_string())?
                    .and_then(|event| event.content_value()["name"].as_str().map(str::to_owned));
                let line = serde_json::json!({
                    "room_id": room_id,
                    "name": name,
                    "version": record.version,
                    "joined_members": record.joined_members,
                    "invited_members": record.invited_members,
                    "created_ts": record.created_ts,
                });
                println!("{line}");
            }
        }
        RoomCommand::Delete {
            room_id,
            block,
            no_purge,
        } => {
            let room_id = ruma::RoomId::parse(&room_id)
                .map_err(|_| format!("{room_id:?} is not a room ID"))?;
            let how = crate::services::admin::DeleteRoom {
                block,
                purge: !no_purge,
                force_purge: false,
            };
            let shutdown = services
                .delete_room_now(&room_id, OPERATOR, &how, None)
                .await
                .map_err(|e| e.to_string())?;
            let line = serde_json::to_string(&shutdown).map_err(|e| e.to_string())?;
            println!("{line}");
        }
    }
    Ok(())
}

async fn backup_command(config: Config, dir: PathBuf) -> Result<(), String> {
    let dest = std::path::absolute(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let manifest = match crate::server::open_storage(&config) {
        Ok(storage) => {
            let now = crate::services::clock::Clock::now_ms(&SystemClock);
            crate::services::backup::create(
                &storage,
                &config.data_dir,
                &config.server_name,
                now,
                &dest,
            )?
        }
        // The server has the database: it takes the backup itself.
        Err(StorageError::InUse(_)) => backup_through_server(&config, &dest).await?,
        Err(error) => return Err(error.to_string()),
    };
    println!(
        "{}",
        serde_json::to_string(&manifest).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// Asks the running server (through its control socket) for a backup.
async fn backup_through_server(
    config: &Config,
    dest: &std::path::Path,
) -> Result<crate::services::backup::Manifest, String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let socket = crate::server::control_socket(config);
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| {
            format!(
                "the database is in use, and the server's control socket {} does not answer: {e}",
                socket.display()
            )
        })?;
    let (read, mut write) = stream.into_split();
    let request = serde_json::json!({ "backup": dest });
    write
        .write_all(format!("{request}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    let answer: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("the server answered {line:?}: {e}"))?;
    if let Some(error) = answer["error"].as_str() {
        return Err(error.to_owned());
    }
    serde_json::from_value(answer["ok"].clone()).map_err(|e| e.to_string())
}

fn restore_command(config: Config, dir: PathBuf) -> Result<(), String> {
    let manifest = crate::services::backup::restore(
        &dir,
        &config.data_dir,
        &crate::server::archive_files(&config),
        &config.server_name,
    )?;
    eprintln!(
        "restored the backup of {} taken at {} ms into {}",
        manifest.server_name,
        manifest.created_ms,
        config.data_dir.display()
    );
    Ok(())
}

/// Deactivates an account as the admin API does (it leaves its rooms).
async fn deactivate_command(config: Config, name: &str, erase: bool) -> Result<(), String> {
    let services = services(config)?;
    let localpart = services
        .accounts
        .resolve_local_user(name)
        .ok_or_else(|| format!("{name} is not a user of this server"))?;
    let exists = services
        .accounts
        .user(&localpart)
        .map_err(|e| e.to_string())?
        .is_some_and(|record| !record.deactivated);
    if !exists {
        return Err(format!("no active user {name} on this server"));
    }
    services
        .deactivate_account(&localpart, None, erase.then_some(OPERATOR))
        .await
        .map_err(|e| e.to_string())?;
    let user_id = services.accounts.user_id(&localpart).to_string();
    println!(
        "deactivated {user_id}{}",
        if erase { " (erased)" } else { "" }
    );
    Ok(())
}

async fn user_command(config: Config, action: UserCommand) -> Result<(), String> {
    // Deactivation acts in rooms: it needs the whole service graph.
    let action = match action {
        UserCommand::Deactivate { name, erase } => {
            return deactivate_command(config, &name, erase).await
        }
        other => other,
    };
    let storage = crate::server::open_storage(&config).map_err(|e| e.to_string())?;
    // Device changes made here take stream positions like the server's.
    let stream = StreamCounter::load(&storage, Arc::default()).map_err(|e| e.to_string())?;
    let accounts = Accounts::new(
        storage,
        config.server_name.clone(),
        &config.password_hashing,
        config.refreshable_access_token_lifetime_ms,
        Arc::new(SystemClock),
        Arc::new(stream),
    );
    match action {
        UserCommand::List { deactivated } => {
            for (localpart, record) in accounts.all().map_err(|e| e.to_string())? {
                if record.deactivated && !deactivated {
                    continue;
                }
                let line = serde_json::json!({
                    "user_id": accounts.user_id(&localpart).to_string(),
                    "admin": record.admin,
                    "deactivated": record.deactivated,
                    "locked": record.locked,
                    "suspended": record.suspended,
                    "created_ts": record.created_ts,
                });
                println!("{line}");
            }
        }
        UserCommand::Deactivate { .. } => unreachable!("handled before the store opened"),
        UserCommand::Add {
            name,
            password,
            admin,
        } => {
            accounts.check_available(&name).map_err(|e| e.to_string())?;
            let password = password_or_prompt(password)?;
            let (user_id, _) = accounts
                .register(&name, Some(&password), admin, None)
                .await
                .map_err(|e| e.to_string())?;
            println!("created {user_id}{}", if admin { " (admin)" } else { "" });
        }
        UserCommand::ResetPassword { name, password } => {
            let localpart = accounts
                .resolve_local_user(&name)
                .ok_or_else(|| format!("{name} is not a user of this server"))?;
            if accounts
                .user(&localpart)
                .map_err(|e| e.to_string())?
                .is_none()
            {
                return Err(format!("no user {name} on this server"));
            }
            let password = password_or_prompt(password)?;
            accounts
                .set_password(&localpart, &password, true, None)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "password of {} reset; every device logged out",
                accounts.user_id(&localpart)
            );
        }
    }
    Ok(())
}

/// The given password, or one typed at a prompt (twice), or the first line
/// of standard input when it is not a terminal.
fn password_or_prompt(given: Option<String>) -> Result<String, String> {
    let password = match given {
        Some(password) => password,
        None if std::io::stdin().is_terminal() => {
            let first = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
            let second = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
            if first != second {
                return Err("the passwords differ".to_owned());
            }
            first
        }
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        return Err("the password may not be empty".to_owned());
    }
    Ok(password)
}
